"""``score.compile``: the model actors' models through ``torch.compile``, and ``score.compile_cache``,
which lets actors on fresh nodes load what earlier actors compiled instead of compiling it again.

Both only ever cost the compile: where compiling fails (no C++ compiler for the CPU backend, no
Triton on a GPU node, an operator the compiler cannot take) the actor warns and runs the eager
model; a cache it cannot read or write is a warning.
"""

from __future__ import annotations

import hashlib
import logging

from steelray import storage
from steelray.config import ScoreConfig
from steelray.storage import S3Config

log = logging.getLogger(__name__)

# Images per model actor above which ``score.compile=auto`` compiles: where the compile is won back
# by the faster model (the figures behind them: docs/benchmarks.md, the compiled runs on this 2-core
# box and on one H100).
COMPILE_FROM = {"cuda": 50_000, "cpu": 2_000}


def use_compile(sc: ScoreConfig, device: str, images: int, actors: int) -> bool:
    """``score.compile``: as set, or for ``auto`` whether each actor has enough images to win back
    the compile."""
    if isinstance(sc.compile, bool):
        return sc.compile
    return images / max(1, actors) >= COMPILE_FROM[device]


def padded_size(n: int, most: int) -> int:
    """The batch size a compiled model runs ``n`` images at: the next power of two, at most ``most``.
    A compiled model is specialised to one batch shape and compiles again for each new one; padding
    short batches (the last one, rows dropped as errors, the sheets a cascade gate
    flags) keeps that to a few shapes, while a cascade's segmenter still runs on about the sheets
    flagged."""
    return min(most, 1 << (n - 1).bit_length())


class CompileCache:
    """torch's portable compile cache (``torch.compiler.save_cache_artifacts`` and
    ``load_cache_artifacts``) in a folder per set of model versions, kind of device (GPU name or CPU
    instruction set), torch version and precision: what is compiled for one does not serve another.

    Each save that holds graphs the folder lacks is written as a file of its own. torch's loader
    (2.11-2.14) gives back only the graphs of the last save in a file, so one file rewritten after
    each new batch shape would lose the earlier shapes; a file per save keeps each, and an actor
    loads them all."""

    SUFFIX = ".torchcache"

    def __init__(self, folder: str, versions: list[str], names: list[str], device, precision: str,
                 s3: S3Config | None):
        import torch

        device = torch.device(device)
        kind = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"cpu-{torch.backends.cpu.get_cpu_capability()}")
        key = "\n".join([*versions, kind, torch.__version__, precision])
        self.folder = storage.join(folder, f"{'+'.join(names)}-{hashlib.sha1(key.encode()).hexdigest()[:16]}")
        self.s3, self.known = s3, set()

    def load(self) -> None:
        """Every graph the folder holds into torch's caches, before anything is compiled here."""
        import torch

        files = [n for n in storage.list_names(self.folder, self.s3) if n.endswith(self.SUFFIX)]
        if not files:
            log.info("score.compile_cache: nothing in %s yet; this actor compiles and writes there", self.folder)
        for name in files:
            uri = storage.join(self.folder, name)
            try:
                info = torch.compiler.load_cache_artifacts(storage.read_bytes(uri, self.s3))
                if info is None:  # torch logs what it could not read
                    raise ValueError("torch read no compiled graph from it")
                self.known |= set(info.inductor_artifacts)
            except Exception as e:  # noqa: BLE001 - a file it cannot read only costs the compile
                log.warning("score.compile_cache: could not load %s, compiling without it: %s: %s", uri,
                            type(e).__name__, e)
        if self.known:
            log.info("score.compile_cache: loaded %d compiled graph(s) from %s", len(self.known), self.folder)

    def save(self) -> None:
        """After a compile: the graphs compiled since the last save, where the folder lacks any."""
        import torch

        try:
            saved = torch.compiler.save_cache_artifacts()
            new = set(saved[1].inductor_artifacts) - self.known if saved else set()
            if new:
                name = hashlib.sha1("\n".join(sorted(new)).encode()).hexdigest()[:16] + self.SUFFIX
                storage.write_atomic(storage.join(self.folder, name), saved[0], self.s3)
                self.known |= new
                log.info("score.compile_cache: wrote %d compiled graph(s) to %s", len(new),
                         storage.join(self.folder, name))
        except Exception as e:  # noqa: BLE001 - the next run compiles again, nothing else is lost
            log.warning("score.compile_cache: could not write to %s: %s: %s", self.folder, type(e).__name__, e)


class CompiledModel:
    """A model that compiles on its first call, and falls back to eager where that fails. Each new
    input shape compiles (or loads from the cache) once, and then goes to ``cache``."""

    def __init__(self, module, name: str, cache: CompileCache | None = None):
        import torch

        self.eager, self.name, self.cache = module, name, cache
        self.compiled = torch.compile(module, dynamic=False)
        self.shapes: set[tuple] = set()   # input shapes it ran; empty: not yet proven to compile
        self.failed = False

    def __call__(self, x):
        import torch

        if self.failed:
            return self.eager(x)
        shape = tuple(x.shape)
        try:
            out = self.compiled(x)
        except torch.cuda.OutOfMemoryError:
            raise  # the batch, not the compile: the actor runs it in halves
        except Exception as e:  # noqa: BLE001 - whatever broke the first compile, eager is the way on
            if self.shapes:
                raise
            log.warning("score.compile: compiling %s failed on this node, scoring without it: %s: %s",
                        self.name, type(e).__name__, (str(e).strip().splitlines() or [""])[0])
            self.failed = True
            return self.eager(x)
        if shape not in self.shapes:
            self.shapes.add(shape)
            if self.cache is not None:
                self.cache.save()
        return out
