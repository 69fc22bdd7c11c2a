"""Where the CPU goes during a scoring job: CPU seconds (utime + stime from /proc) per process role,
for two jobs in one local Ray session (Ray Data's helper actors start with the first).

    .ci/in-venv python benchmarks/score_cpu_account.py [N sheets, default 600] [score.key=value ...]

resnet18 multi-label at 128x800, batch 16, 2 torch threads, on 2 CPUs, as in score_bench.py.
"""
import collections
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ray
import score_bench as sb
from steelray import synth, config
from steelray.scoring import job as scoring_job

work = "/tmp/steelray-cpu-account"
n = int(sys.argv[1]) if len(sys.argv) > 1 else 600
extra = sys.argv[2:]
shutil.rmtree(work, ignore_errors=True)
made = synth.make_severstal(work + "/src", 100, seed=11, workers=2)
srcs = sorted(os.path.join(made.images, f) for f in os.listdir(made.images))
shutil.rmtree(work + "/eff", ignore_errors=True)
sb.fill(work + "/eff", srcs, n)
ckpt = work + "/ckpt"
sb.make_checkpoint(ckpt, "resnet18", (128, 800))
ray.init(num_cpus=2, include_dashboard=None, runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
time.sleep(3)

def snapshot():
    out = {}
    tck = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit(): continue
        try:
            stat = open(f"/proc/{pid}/stat").read()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            cpu = (int(fields[11]) + int(fields[12])) / tck
            cmd = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:200]
            out[int(pid)] = (cpu, cmd, name)
        except Exception:
            pass
    return out

def role(cmd, name, pid):
    if pid == os.getpid(): return "driver (this process: Ray Data executor)"
    for key in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "agent"):
        if key in cmd or key in name: return key
    if "ray::" in name or "ray::" in cmd or "default_worker" in cmd: return "ray worker: " + name
    return None

for rep in range(2):
    a = snapshot(); t0 = time.time()
    shutil.rmtree(work + "/out", ignore_errors=True)
    job = config.load(None, [f"score.input={work}/eff", f"score.checkpoint={ckpt}", f"score.output={work}/out",
                             "score.batch_size=16", "score.actor_threads=2", "score.actor_cpus=1", "score.decode_batch=32", *extra],
                      config.ScoreJob)
    s = scoring_job.run(job)
    b = snapshot(); wall = time.time() - t0
    agg = collections.Counter()
    for pid, (cpu, cmd, name) in b.items():
        r = role(cmd, name, pid)
        if r is None: continue
        agg[r] += cpu - a.get(pid, (0,))[0]
    print(f"{n} sheets, {s.images_per_s:.1f} img/s, wall {wall:.1f}s, CPU available {2*wall:.0f} s")
    for r, c in agg.most_common():
        print(f"  {c:7.1f} s  {r}")
