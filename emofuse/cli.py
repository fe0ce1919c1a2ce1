"""The `emofuse` command. Thin: parse arguments, load the config, call one stage function.

Errors a user can cause (UserError) print as one line and exit with code 2; `--debug` shows
the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from emofuse.errors import UserError


class Group(click.Group):
    """Turns UserError, and click's own usage errors (unknown option, missing argument), into one
    line + exit code 2; --debug shows the traceback of a UserError instead."""

    def main(self, *args, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            # Not standalone: click hands its errors to us instead of printing a usage block.
            return super().main(*args, standalone_mode=False, **kwargs)
        except getattr(click.exceptions, "NoArgsIsHelpError", ()) as e:  # plain `emofuse` (click >= 8.2): the help
            click.echo(e.format_message())
            sys.exit(0)
        except click.ClickException as e:  # UsageError, BadParameter, NoSuchOption, ...
            hint = f" (see {e.ctx.command_path} --help)" if getattr(e, "ctx", None) else ""
            click.echo("error: " + " ".join(e.format_message().splitlines()) + hint, err=True)
            sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            # One line whatever the message holds (a key or path with a newline in it, say).
            click.echo("error: " + " ".join(str(e).splitlines()), err=True)
            sys.exit(2)


@click.group(cls=Group)
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def main(ctx, debug):
    """emofuse: multimodal emotion recognition from cached self-supervised features."""
    ctx.obj = {"debug": debug}


config_arg = click.argument("config", type=click.Path(path_type=Path))
overrides_arg = click.argument("overrides", nargs=-1)
quiet_opt = click.option("--quiet", is_flag=True, help="No progress bars.")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo_out"), show_default=True,
              help="Folder for the generated corpus, the cache and the runs.")
@click.option("--size", type=click.Choice(["small", "full"]), default="full", show_default=True)
@click.option("--seeds", type=int, default=None, help="Seeds per model (default: the config's).")
@quiet_opt
def demo(out, size, seeds, quiet):
    """Generate the demo corpus, extract, train, and print the modality ablation table."""
    from emofuse.demo import run_demo

    run_demo(out, size=size, seeds=seeds, progress=not quiet)


@main.command()
@config_arg
@overrides_arg
@click.option("--workers", "processes", type=int, default=0, help="Run on a local dask cluster of N worker processes.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N for the neural encoders (default: cuda when present).")
@click.option("--scheduler", default=None, help="Run on an existing dask.distributed cluster (tcp://host:8786).")
@click.option("--trust-checkpoint", is_flag=True,
              help="Allow pickled checkpoints that need full unpickling (runs code from the file: only for files you trust).")
@quiet_opt
def extract(config, overrides, processes, device, scheduler, trust_checkpoint, quiet):
    """Run each frozen encoder over the corpus once; write feature stores to the cache."""
    from emofuse.config import load_config
    from emofuse.corpora import load_corpus
    from emofuse.extract.pipeline import extract_corpus, summary_lines

    cfg = load_config(config, overrides)
    if trust_checkpoint:  # only the backends that load pickled checkpoints know this option
        for spec in cfg.extract.encoders.values():
            if spec.get("backend") in ("fabnet", "fairseq"):
                spec["trust_checkpoint"] = True
    if device:  # the torch-based backends take a device option; opensmile and dlib run on the CPU
        for spec in cfg.extract.encoders.values():
            if spec.get("backend") in ("hf", "minilm", "fairseq", "fabnet"):
                spec["device"] = device
    corpus = load_corpus(cfg.corpus, progress=not quiet)
    if processes or scheduler:
        from emofuse.extract.distributed import extract_distributed

        results = extract_distributed(cfg, corpus, client_or_address=scheduler, n_workers=processes or 2,
                                      progress=not quiet)
    else:
        results = extract_corpus(cfg, corpus, progress=not quiet)
    for line in summary_lines(results):
        click.echo(line)


@main.command()
@click.argument("config", type=click.Path(path_type=Path), required=False)
@overrides_arg
@click.option("--seeds", type=int, default=None, help="Number of seeds (overrides train.seeds).")
@click.option("--folds", is_flag=True, help="Run every fold of a cross-validated protocol and pool the results.")
@click.option("--workers", type=int, default=None,
              help="Train N seeds (folds with --folds) at once in N processes (overrides train.workers).")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="Continue an interrupted run from its folder (its saved config; no CONFIG).")
@quiet_opt
def train(config, overrides, seeds, folds, workers, resume, quiet):
    """Train the fusion model on cached features; the run goes to <train.runs>/<train.name>/."""
    from emofuse.config import load_config
    from emofuse.fuse.evaluate import summary_line
    from emofuse.fuse.train import resume_run, train_folds
    from emofuse.fuse.train import train as train_runs

    if resume is not None:
        if config is not None or overrides or seeds or folds or workers:
            raise UserError("--resume RUN continues a run with its saved config: give no CONFIG, overrides, "
                            "--seeds, --folds or --workers")
        summary = resume_run(resume, progress=not quiet, log=click.echo)
    else:
        if config is None:
            raise UserError("give a CONFIG to train, or --resume RUN to continue a run")
        cfg = load_config(config, list(overrides) + ([f"train.seeds={seeds}"] if seeds else [])
                          + ([f"train.workers={workers}"] if workers is not None else []))
        summary = (train_folds if folds else train_runs)(cfg, progress=not quiet, log=click.echo)
    click.echo(summary_line(summary))


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--ablation", is_flag=True, help="Also train and test every modality subset (A, T, V, AT, AV, TV, ATV).")
@click.option("--robustness", is_flag=True, help="Also test with each modality dropped or corrupted by Gaussian noise.")
@quiet_opt
def evaluate(run, ablation, robustness, quiet):
    """Test a trained run: report.json, report.md, confusion.png in the run folder."""
    from emofuse.fuse import evaluate as ev

    ev.evaluate_run(run, log=click.echo)
    if ablation:
        ev.ablation(run, progress=not quiet, log=click.echo)
    if robustness:
        ev.robustness(run, log=click.echo)


@main.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("media", required=False)
@click.option("--text", default=None, help="Transcript of the clip.")
@click.option("--transcript", type=click.Path(path_type=Path), default=None, help="File holding the transcript.")
@click.option("--audio", default=None, help="Audio file (default: MEDIA).")
@click.option("--video", default=None, help="Video file (default: MEDIA).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def predict(run, media, text, transcript, audio, video, as_json):
    """Predict the emotion of one new clip with a trained run's extraction settings."""
    import json

    from emofuse.fuse.predict import format_prediction, predict_media

    if transcript is not None:
        if not transcript.is_file():
            raise UserError(f"transcript file not found: {transcript}")
        text = transcript.read_text(encoding="utf-8", errors="replace")
    if media is None and audio is None and video is None and text is None:
        raise UserError("give a media file, --audio/--video, or --text")
    result = predict_media(run, media, text=text, audio=audio, video=video)
    click.echo(json.dumps(result, indent=2) if as_json else format_prediction(result))


@main.command()
@click.argument("config", type=click.Path(path_type=Path), required=False)
def encoders(config):
    """List every encoder backend, whether it is installed, and (with CONFIG) whether its checkpoints are on disk."""
    from emofuse.config import load_config
    from emofuse.extract.encoders.base import backend_status

    cfg = load_config(config) if config else None
    for row in backend_status(cfg.extract.encoders if cfg else None):
        state = "installed" if row["installed"] else "missing " + ", ".join(row["missing"])
        click.echo(f"{row['backend']:<10} {row['modality']:<11} {state:<22} {row['what']}")
        for c in row.get("configured", []):
            click.echo(f"{'':<10} {c['modality']}: {c['file']} {'(present)' if c['present'] else '(NOT FOUND)'}")


@main.group()
def cache():
    """Inspect and check feature stores."""


@cache.command()
@click.argument("path", type=click.Path(path_type=Path))
def info(path):
    """Modality, encoder, dim, utterances, frames, bytes and failures of a store (or every store under PATH)."""
    from emofuse.cache.store import FeatureStore

    for store_dir in store_dirs(path):
        store = FeatureStore(store_dir)
        i = store.info()
        store.close()
        click.echo(f"{i['path']}\n  modality {i['modality']}  encoder {i['encoder']['backend']}  "
                   f"fingerprint {i['fingerprint'][:12]}\n  dim {i['dim']}  layers {i['layers']}  fps {i['fps']}\n"
                   f"  utterances {i['utterances']}  frames {i['frames']}  bytes {i['bytes']:,}  shards {i['shards']}"
                   f"  failures {i['failures']}")
        for reason, n in sorted(i["failure_reasons"].items()):
            click.echo(f"    {n}x {reason}")


@cache.command()
@click.argument("path", type=click.Path(path_type=Path))
def verify(path):
    """Check every shard: fingerprint, offsets, duplicate ids, NaN/Inf, truncation. Exit 1 if anything is wrong."""
    from emofuse.cache.store import FeatureStore

    bad = 0
    for store_dir in store_dirs(path):
        problems = FeatureStore.verify(store_dir)
        for p in problems:
            click.echo(p, err=True)
        bad += len(problems)
        click.echo(f"{store_dir}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    sys.exit(1 if bad else 0)


def store_dirs(path: Path) -> list[Path]:
    if (path / "store.json").exists():
        return [path]
    found = sorted(p.parent for p in path.glob("**/store.json")) if path.is_dir() else []
    if not found:
        raise UserError(f"{path}: no feature store here (no store.json at or below it)")
    return found


if __name__ == "__main__":
    main()
