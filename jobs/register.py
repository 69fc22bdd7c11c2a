"""Register a checkpoint in the MLflow model registry, and move its aliases (production, candidate).

    python jobs/register.py --checkpoint s3://runs/neu/epoch-0042 --name neu-surface --alias candidate \\
        tracking.uri=http://mlflow.plant:5000
    python jobs/register.py --name neu-surface --version 3 --alias production tracking.uri=...
    python jobs/score.py --checkpoint models:/neu-surface@production ... tracking.uri=...

A checkpoint folder (or an exported .onnx) becomes a new version of --name, its files copied into the
registry (the same files again are the same version); --alias moves each alias to it. With --version,
only the aliases move. Scoring, evaluation, export and the night report take models:/<name>@<alias>
and models:/<name>/<version> wherever they take a checkpoint. Settings: `register.*`, `tracking.*`
(tracking.uri, or MLFLOW_TRACKING_URI), `s3.*`.
"""

from __future__ import annotations

import sys

from steelray import cli, config

EXIT_CODES = {cli.DONE: "registered (or the aliases moved)",
              cli.BAD_ARGUMENTS: "bad arguments, not a checkpoint, or no such model, version or alias",
              cli.BUSY: "the MLflow server cannot be reached: retry later"}


def main(argv=None) -> int:
    p = cli.parser(__doc__, EXIT_CODES, config_help="YAML with register:, tracking: and s3: sections (optional)")
    p.add_argument("--checkpoint", help="checkpoint folder (local or s3://) or .onnx to register")
    p.add_argument("--name", help="registered model name (register.name)")
    p.add_argument("--version", type=int, help="an existing version whose aliases to move (register.version)")
    p.add_argument("--alias", action="append", default=[], help="alias to move to the version (repeatable)")
    args = p.parse_args(argv)
    flags = [f"register.{k}={v}" for k in ("checkpoint", "name", "version") if (v := getattr(args, k))]
    flags += [f"register.aliases=[{','.join(args.alias)}]"] * bool(args.alias)
    from steelray import registry, tracking

    try:
        reg = registry.register(cli.load(args, registry.RegisterJob, flags))
    except (config.ConfigError, registry.RegistryError) as e:
        print(f"register: {e}", file=sys.stderr)
        return cli.BAD_ARGUMENTS
    except tracking.TrackingUnavailable as e:
        print(f"register: {e}", file=sys.stderr)
        return cli.BUSY
    print(f"{reg.name} version {reg.version}{' (new)' if reg.created else ' (already registered)'}: {reg.checkpoint}")
    print(f"source: {reg.source}; sha256 {reg.sha256[:16]}")
    print(f"aliases: {', '.join(reg.aliases) or 'none'}")
    print(f"models:/{reg.name}/{reg.version}")
    return cli.DONE


if __name__ == "__main__":
    sys.exit(main())
