"""The ``seed`` command line: one function per command over the stages. User mistakes print one line
(``seed: error: ...``) and exit 2.

A front end, like ``flows/``: it imports the stages; no stage imports it. Stage modules are
imported inside the commands so that ``seed --help``, ``seed --version``, ``seed config`` and
``seed inspect`` import neither torch nor Prefect (``tests/integration/test_cli_light.py``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from seed.errors import MachineError, SeedError
from seed.lifetime import exit_with_parent


DISTRIBUTION = "seed-distill"  # the name in pyproject.toml, which `seed --version` reads the installed version of
DEMO = "configs/demo.yaml"
DEMO_TEACHER = "data/runs/demo-teacher-moco/teacher.pth"  # what the demo's pre-training writes
DEMO_CACHE = "data/caches/demo-fashion-mnist.zarr"


def _count(least: int, most: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``least`` (and at most ``most``; argparse names the flag and exits
    2 otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer of at least {least}, got {value}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"expected an integer of at most {most:,}, got {value:,}")
        return value
    return parse


def _examples(*lines: str) -> str:
    """A help page's closing ``examples:`` block: command lines that work after ``make demo`` in the repository."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


class _Version(argparse.Action):
    """``--version``: the installed distribution's version, looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the installed seed version and exit", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version(DISTRIBUTION)
        except PackageNotFoundError:
            text = f"unknown ({DISTRIBUTION} is not installed: pip install -e .)"
        print(f"seed {text}")
        parser.exit(0)


def _common_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="run config YAML (default: the built-in defaults, which are not "
                                          f"{DEMO}'s; `seed config` prints them)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set cache.views=8 (repeatable)")
    p.add_argument("--storage", help="storage.yaml (default: $SEED_STORAGE or ./storage.yaml)")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="seed", description="SEED distillation with a run-once teacher cache.",
                                     formatter_class=raw, epilog=_examples(
                                         "seed shards fashion-mnist",
                                         f"seed pretrain -c {DEMO}",
                                         "seed config --template imagenet > imagenet.yaml",
                                         f"seed inspect {DEMO_CACHE}"))
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True)

    shards = sub.add_parser("shards", help="convert a data set into webdataset tar shards, or describe shards made by "
                                           "other tools", formatter_class=raw,
                            epilog=_examples("seed shards fashion-mnist",
                                             "seed shards fashion-mnist --limit 2000 --per-shard 500 --out data/shards/fm-small",
                                             "seed shards imagefolder ~/pictures/flowers --split train",
                                             "seed shards describe /data/imagenet-wds/train --split train"))
    kinds = shards.add_subparsers(dest="kind", required=True)
    fm = kinds.add_parser("fashion-mnist", help="Fashion-MNIST idx files -> train/ and test/ shards", formatter_class=raw,
                          epilog=_examples("seed shards fashion-mnist",
                                           "seed shards fashion-mnist --limit 2000 --per-shard 500 --out data/shards/fm-small",
                                           "seed shards fashion-mnist --source /usr/share/datasets/fashion-mnist --out data/shards/fm-copy"))
    fm.add_argument("--source", default=None, help="directory of the idx(.gz) files (default: the Debian package's)")
    imf = kinds.add_parser("imagefolder", help="class-per-folder image tree -> shards", formatter_class=raw,
                           epilog=_examples("seed shards imagefolder ~/pictures/flowers --split train",
                                            "seed shards imagefolder ~/pictures/flowers-val --split test --out data/shards/flowers-test",
                                            "seed shards imagefolder ~/imagenet/train --per-shard 1250 --seed 1"))
    imf.add_argument("src", help="root directory with one sub-directory per class")
    imf.add_argument("--split", default="train", help="split name (sub-directory and shard prefix)")
    imf.add_argument("--seed", type=int, default=0, help="seed of the order the images are written in (default 0)")
    imf.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                     help="write the images class by class, as in the tree (each shard then holds one or two "
                          "classes, and training batches only the classes in its shuffle buffer)")
    desc = kinds.add_parser("describe", formatter_class=raw,
                            help="count shards made by other tools and write their _info.json (each read once), so "
                                 "stages need not scan them",
                            epilog=_examples("seed shards describe /data/imagenet-wds/train --split train",
                                             "seed shards describe s3://bucket/imagenet-1k-wds --overwrite --threads 32"))
    desc.add_argument("dir", help="directory or URL holding the .tar shards (resolved under the shards root)")
    desc.add_argument("--split", help="the split's name when there is no _info.json (default: the directory's name)")
    desc.add_argument("--threads", type=_count(1), default=None,
                      help="shards read at once (default: 1 on local disk, where the CPU limits it; 16 for a URL, where "
                           "the store's latency does)")
    desc.add_argument("--overwrite", action="store_true",
                      help="add the counts and headers_read to an existing _info.json (its other fields are kept)")
    desc.add_argument("--storage", help="storage.yaml")
    for p in (fm, imf):
        p.add_argument("--out", help="output directory or URL (default: <shards root>/<name>)")
        p.add_argument("--per-shard", type=_count(1), default=1000, help="samples per shard (default 1000)")
        p.add_argument("--limit", type=_count(1), default=None, help="convert only the first N samples of each split")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing output, all of it (every split in it): give each split of an image "
                            "folder its own --out")
        p.add_argument("--storage", help="storage.yaml")

    teacher = sub.add_parser("teacher", help="run the teacher once over V views of every image into the cache",
                             formatter_class=raw, epilog=_examples(
                                 f"seed teacher -c {DEMO} --set teacher.checkpoint={DEMO_TEACHER}",
                                 f"seed teacher -c {DEMO} --set teacher.checkpoint={DEMO_TEACHER} --set cache.name=demo-procs --procs 2",
                                 f"seed teacher -c {DEMO} --set teacher.checkpoint={DEMO_TEACHER} --set cache.name=demo-parts --shards 0,2,4"))
    _common_run(teacher)
    teacher.add_argument("--overwrite", action="store_true", help="replace a cache made with another configuration")
    teacher.add_argument("--shards", help="only these input shard indices, e.g. 0,1,5 (one worker's part; a later seed teacher "
                              "without --shards marks the cache complete once all are done)")
    teacher.add_argument("--procs", type=_count(0), metavar="N",
                         help="split the shards over N processes on this node, one per GPU on CUDA (0 = one per "
                              "visible GPU); the same cache as one process")
    teacher.add_argument("--quiet", action="store_true", help="no progress bar")

    bank = sub.add_parser("bank", help="sample the instance bank and cache the teacher targets", formatter_class=raw,
                          epilog=_examples(f"seed bank -c {DEMO}",
                                           f"seed bank -c {DEMO} --set bank.topk=64   # rebuilds the bank alone"))
    _common_run(bank)

    student = sub.add_parser("student", help="train students by SEED from the cache (or online)", formatter_class=raw,
                             epilog=_examples(f"seed student -c {DEMO}",
                                              f"seed student -c {DEMO} --set train.run=r10t --set 'train.students=[{{arch: resnet10t}}]'",
                                              f"seed student -c {DEMO} --resume",
                                              f"seed student -c {DEMO} --set train.run=online --set train.mode=online "
                                              f"--set teacher.checkpoint={DEMO_TEACHER}"))
    _common_run(student)
    student.add_argument("--resume", action="store_true",
                         help="continue from the last checkpoints (every epoch's end, and every train.checkpoint_steps "
                              "steps)")
    student.add_argument("--events", action="store_true",
                         help="print one machine-readable line per finished epoch instead of progress bars "
                              "(how the ranks report to a launcher)")

    pretrain = sub.add_parser("pretrain", help="make a teacher: MoCo-v2 (default) or supervised", formatter_class=raw,
                              epilog=_examples(f"seed pretrain -c {DEMO}   # -> {DEMO_TEACHER}",
                                               f"seed pretrain -c {DEMO} --set pretrain.method=supervised --set pretrain.name=demo-teacher-sup",
                                               f"seed pretrain -c {DEMO} --set pretrain.nproc=2 --set pretrain.name=demo-teacher-2r",
                                               f"seed pretrain -c {DEMO} --resume"))
    _common_run(pretrain)
    pretrain.add_argument("--resume", action="store_true",
                          help="continue from the last checkpoint (every epoch's end, and every "
                               "pretrain.checkpoint_steps steps)")
    pretrain.add_argument("--events", action="store_true",
                          help="print one machine-readable line per finished epoch instead of progress bars "
                               "(how the ranks report to a launcher)")

    evaluate = sub.add_parser("evaluate", help="kNN and linear probe of teacher, students and baselines; writes the report",
                              formatter_class=raw, epilog=_examples(
                                  f"seed evaluate -c {DEMO} --set teacher.checkpoint={DEMO_TEACHER}",
                                  f"seed evaluate -c {DEMO} --no-teacher   # the teacher's saved scores",
                                  f"seed evaluate -c {DEMO} --procs 0   # features extracted by a process per GPU"))
    _common_run(evaluate)
    evaluate.add_argument("--no-teacher", action="store_true", help="do not load the teacher (reuse its saved scores)")
    evaluate.add_argument("--procs", type=_count(0), metavar="N", default=1,
                          help="extract the features in N processes on this node, one per GPU on CUDA (0 = one per "
                               "visible GPU); the same report as one process")
    evaluate.add_argument("--part", help=argparse.SUPPRESS)  # one of those processes: the spec its parent wrote

    inspect = sub.add_parser("inspect", help="describe a teacher cache", formatter_class=raw,
                             epilog=_examples(f"seed inspect {DEMO_CACHE}",
                                              f"seed inspect {DEMO_CACHE} --neighbours fmnist-train-000042",
                                              f"seed inspect {DEMO_CACHE} --plots data/reports/plots",
                                              f"seed inspect {DEMO_CACHE} --verify"))
    inspect.add_argument("cache", help="cache path or URL (a Zarr group)")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--sample", type=_count(0, 20_000), default=512,
                         help="views sampled for norm and similarity statistics (at most 20,000: their n x n "
                              "similarities are held in memory)")
    mode = inspect.add_mutually_exclusive_group()  # one report a call; the plain description without them
    mode.add_argument("--neighbours", metavar="KEY", help="write a PNG of KEY's cached views and nearest bank entries")
    inspect.add_argument("--out", help="PNG path for --neighbours (default: ./<KEY>-neighbours.png)")
    mode.add_argument("--plots", metavar="DIR", help="write PNGs: the own view's margin over the nearest other "
                                                   "image, the top-k mass by rank, neighbour similarities, a PCA scatter")
    inspect.add_argument("--storage", help="storage.yaml whose storage_options read a URL cache "
                                           "(default: $SEED_STORAGE or ./storage.yaml)")
    mode.add_argument("--verify", action="store_true",
                      help="read every chunk (checksums) and check the completion records against the data; "
                           "exit 1 naming each problem")

    config = sub.add_parser("config", help="print a commented config template, or a resolved config with each "
                                           "value's origin", formatter_class=raw,
                            epilog=_examples("seed config --template imagenet > imagenet.yaml",
                                             f"seed config -c {DEMO} --set cache.views=4",
                                             "seed config   # the defaults"))
    config.add_argument("--template", choices=_template_names(),
                        help="print this commented starting config (with --set: resolved, as -c would)")
    config.add_argument("--config", "-c", help="run config YAML to resolve (default: the built-in defaults)")
    config.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set cache.views=8 (repeatable)")

    export = sub.add_parser("export", help="write a trained student's weights for timm or any safetensors reader",
                            formatter_class=raw, epilog=_examples(
                                f"seed export demo -c {DEMO}",
                                f"seed export demo -c {DEMO} --student mobilenetv3_small_050 --out exported",
                                f"seed export demo -c {DEMO} --format safetensors --head"))
    export.add_argument("run", help="the student run (train.run), under the runs root")
    _common_run(export)
    export.add_argument("--student", help="one student of the run by name (default: every student)")
    export.add_argument("--format", dest="fmt", choices=("timm", "safetensors"), default="timm",
                        help="timm (default): timm's hub layout, timm.create_model('local-dir:DIR') rebuilds it; "
                             "safetensors: the weights and seed's description (also small_input students)")
    export.add_argument("--head", action="store_true", help="also write the SEED projection head (head.safetensors)")
    export.add_argument("--out", help="output directory (default: <runs>/RUN/<student>/export; with several "
                                      "students, one sub-directory each)")
    return parser


def _template_names() -> list[str]:
    """``seed.config.templates()`` without importing ``seed.config`` (yaml, fsspec, numpy): every command
    builds the parser, ``seed --help`` included."""
    from importlib.resources import files

    return sorted(p.name.removesuffix(".yaml") for p in files("seed").joinpath("templates").iterdir()
                  if p.name.endswith(".yaml"))


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str))


def _run_config(args: argparse.Namespace) -> tuple[Any, Any]:
    from seed.config import load_config
    from seed.storage import load_storage

    return load_config(args.config, args.overrides), load_storage(args.storage)


def cmd_shards(args: argparse.Namespace) -> int:
    from seed import shards
    from seed.storage import load_storage

    storage = load_storage(args.storage)
    if args.kind == "describe":
        directory = storage.resolve("shards", args.dir)
        info = shards.describe_shards(directory, split=args.split, threads=args.threads, overwrite=args.overwrite,
                                      progress=True)
        for name, split in info["splits"].items():
            unread = info["unread"][name]
            first = unread[0] if unread else {}
            said = "every image header reads" if not unread else (
                f"{len(unread)} sample{'s' if len(unread) > 1 else ''} whose image header does not read (first: "
                f"{first['key']!r} in {first['url']}: {first['reason']}): stages skip them, and a resumed "
                "pre-training reads its shards up to its place")
            print(f"{name}: {split['num_samples']} samples in {len(split['filenames'])} shards; {said}")
        print(f"wrote {directory}/{shards.INFO_FILE}")
        return 0
    if args.kind == "fashion-mnist":
        out = args.out or storage.resolve("shards", "fashion-mnist")
        info = shards.fashion_mnist_to_shards(out, source=args.source or shards.FASHION_MNIST_DIR,
                                              per_shard=args.per_shard, limit=args.limit, overwrite=args.overwrite)
    else:
        out = args.out or storage.resolve("shards", args.src.rstrip("/").rsplit("/", 1)[-1])
        info = shards.imagefolder_to_shards(args.src, out, split=args.split, per_shard=args.per_shard,
                                            limit=args.limit, overwrite=args.overwrite, shuffle=args.shuffle,
                                            seed=args.seed)
    for name, split in info["splits"].items():
        print(f"{name}: {split['num_samples']} samples in {len(split['filenames'])} shards -> {out}/{name}/")
    return 0


def cmd_teacher(args: argparse.Namespace) -> int:
    from pipeline import teacher
    from seed.report import teacher_totals_text

    cfg, storage = _run_config(args)
    try:
        only = [int(s) for s in args.shards.split(",")] if args.shards is not None else None
    except ValueError:
        raise SeedError(f"--shards {args.shards!r}: expected shard indices separated by commas, e.g. 0,2,4") from None
    if args.procs is not None:
        if only is not None:
            raise SeedError("--procs N splits all shards itself; it does not combine with --shards")
        result = teacher.run_processes(cfg, storage, args.procs, overwrite=args.overwrite, progress=not args.quiet)
    else:
        # A --shards worker leaves the root attributes to the coordinator (one writer for zarr.json):
        # `seed teacher` without --shards embeds what is left and marks the cache complete.
        result = teacher.run(cfg, storage, overwrite=args.overwrite, shards=only, finalize=only is None,
                             progress=not args.quiet)
    print(f"cache {result.cache}: embedded {len(result.embedded)} shards, {len(result.skipped_done)} already done"
          + (f"; complete: {teacher_totals_text(result.totals)}" if result.totals is not None
             else "; not complete yet (run seed teacher without --shards once all workers finish)"))
    return 0


def _cache_run_config(args: argparse.Namespace) -> tuple[Any, Any]:
    """``_run_config`` for the stages that read a cache: a missing one is named with the caches that exist."""
    from seed.config import require_cache

    cfg, storage = _run_config(args)
    require_cache(cfg, storage)
    return cfg, storage


def cmd_bank(args: argparse.Namespace) -> int:
    cfg, storage = _cache_run_config(args)  # before the stage's imports: a missing cache is named at once
    from pipeline import bank

    result = bank.run(cfg, storage)
    if result.skipped:
        print(f"bank of {result.cache} is complete with these parameters; nothing to do")
        return 0
    s = result.summary
    fid = s["fidelity"]
    print(f"bank of {result.cache}: K={s['K']} top-{s['topk']} tau_T={s['tau_t']} ({s['index']}, {s['normaliser']} "
          f"normaliser): {s['views']} views at {s['views_per_s']:.0f} views/s; captured mass mean "
          f"{fid['mass']['mean']:.4f}, KL(dense||sparse) mean {fid['kl']['mean']:.2e}; targets written in "
          f"{s['write_seconds']:.1f} s behind the computation, which waited {s['write_wait_seconds']:.1f} s for them")
    return 0


def _launched(stage: Any, args: argparse.Namespace, cfg: Any, storage: Any, epochs: int, name: str) -> Any:
    """Run ``stage`` (the student or pre-training module, ``name`` in its epoch lines) as this command asks: started
    in ranks of ``torchrun`` (``stage.launch``, which says so) when its settings ask for more than one process and
    this one is not a rank already; as a rank reporting to such a launcher (``--events``: epochs as event lines, a
    user's mistake marked as such); or in this process."""
    from seed import launcher
    from seed.devices import Launch
    from seed.report import epoch_text

    if stage.processes(cfg) > 1 and Launch.from_env().world == 1:  # not started by torchrun: start it
        return stage.launch(cfg, storage, resume=args.resume, on_line=lambda line: print(line, flush=True),
                            on_epoch=lambda e, row: print(epoch_text(name, e + 1, epochs, row), flush=True))
    if args.events:
        try:
            return stage.run(cfg, storage, resume=args.resume, progress=False,
                             on_epoch=lambda e, row: print(launcher.epoch_event(e, row), flush=True))
        except SeedError as exc:  # tell the launcher that this rank stopped on a user's mistake: no retry
            if not isinstance(exc, MachineError):
                print(launcher.MISTAKE, flush=True)
            raise
    return stage.run(cfg, storage, resume=args.resume)


def _speaks(args: argparse.Namespace) -> bool:
    """Whether this process reports the run: rank 0 (the other ranks' losses are of their own shards), and not
    under ``--events`` (its launcher does)."""
    from seed.devices import Launch

    return Launch.from_env().rank == 0 and not args.events


def cmd_student(args: argparse.Namespace) -> int:
    from seed.config import require_cache

    cfg, storage = _run_config(args)
    if cfg.train.mode == "cached":
        require_cache(cfg, storage)
    from pipeline import student

    result = _launched(student, args, cfg, storage, cfg.train.optim.epochs, "student")
    if not _speaks(args):
        return 0
    last = result.metrics[-1]
    print(f"run {result.run} ({result.mode}): " + ", ".join(
        f"{name} loss {last['loss'][name]:.4f} -> {path}" for name, path in result.students.items()))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pipeline import pretrain

    cfg, storage = _run_config(args)
    result = _launched(pretrain, args, cfg, storage, cfg.pretrain.optim.epochs, "pretrain")
    if not _speaks(args):
        return 0
    t = result.teacher
    print(("reused " if result.skipped else "wrote ") + f"teacher {result.checkpoint}; use it with: "
          f"--set teacher.arch={t.arch} --set teacher.checkpoint={t.checkpoint} --set teacher.format={t.format} "
          f"--set teacher.output={t.output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg, storage = _cache_run_config(args)
    from pipeline import evaluate
    from seed.report import markdown_table

    if args.part:
        evaluate.run_part(cfg, storage, args.part)
        return 0
    result = evaluate.run(cfg, storage, include_teacher=not args.no_teacher, procs=args.procs)
    print(markdown_table(result.results, [("name", "encoder"), ("knn", "kNN top-1 (%)"), ("nn1", "1-NN (%)"),
                                          ("linear", "linear (%)"), ("probe", "probe"), ("init", "notes")]))
    print(f"report: {result.report}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from seed.inspect import describe, format_text, neighbours, plots, verify
    from seed.storage import load_storage

    if args.storage:
        load_storage(args.storage)  # its storage_options apply to the cache's URL
    if args.out and not args.neighbours:
        raise SeedError("--out names the PNG of --neighbours KEY; give --neighbours too")
    if args.json and args.plots:
        raise SeedError("--json does not combine with --plots, which writes PNGs (it prints their paths)")

    if args.verify:
        report = verify(args.cache)
        if args.json:
            _print_json(report)
        for problem in report["problems"] if not args.json else []:
            print(f"{args.cache}: {problem}")
        if not report["problems"] and not args.json:
            unfinished = ("" if report["status"] == "complete" else
                          f" (the cache is not complete: {report['shards']} of {report['n_shards']} shards done)")
            print(f"{args.cache}: verified {report['chunks']} chunks and {report['shards']} shard records: no problem"
                  + unfinished)
        return 1 if report["problems"] else 0

    if args.neighbours:
        out = args.out or f"{args.neighbours.replace('/', '_')}-neighbours.png"
        result = neighbours(args.cache, args.neighbours, out)
        if args.json:
            _print_json(result)
        else:
            print(f"wrote {out}: " + ", ".join(f"row {n['row']} (label {n['label']}, sim {n['similarity']:.3f})"
                                               for n in result["neighbours"]))
        return 0
    if args.plots:
        for path in plots(args.cache, args.plots):
            print(f"wrote {path}")
        return 0
    info = describe(args.cache, sample=args.sample)
    if args.json:
        _print_json(info)
    else:
        print(format_text(info))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from seed.config import format_resolved, resolve_config, template

    if args.template and args.config:
        raise SeedError("--template and -c both name a config; give one")
    if args.template and not args.overrides:
        print(template(args.template), end="")
        return 0
    if args.template:
        import importlib.resources

        with importlib.resources.as_file(importlib.resources.files("seed").joinpath("templates", f"{args.template}.yaml")) as path:
            resolved = resolve_config(path, args.overrides, label=f"template {args.template}")
    else:
        resolved = resolve_config(args.config, args.overrides)
    print(format_resolved(resolved), end="")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline import export

    cfg, storage = _run_config(args)
    result = export.run(cfg, storage, run=args.run, student=args.student, fmt=args.fmt, head=args.head, out=args.out)
    for s in result.students:
        state = "" if s.finished else ", unfinished"
        print(f"{s.student} ({s.position}{state}, {result.format}): {', '.join(s.files)}")
    return 0


INTERRUPTED = {  # what an interrupted command leaves, by command (the rest: nothing to continue from)
    "student": "its last checkpoint is kept; re-run with --resume to continue",
    "pretrain": "its last checkpoint is kept; re-run with --resume to continue",
    "teacher": "completed shards are kept, re-run to resume",
    "bank": "completed shards are kept, re-run to resume",
    "shards": "nothing complete was published (shards appear once all are written); re-run to convert",
    "shards describe": "nothing was written (the _info.json is written once every shard is read); re-run it",
}

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "shards": cmd_shards, "teacher": cmd_teacher, "bank": cmd_bank, "student": cmd_student,
    "pretrain": cmd_pretrain, "evaluate": cmd_evaluate, "inspect": cmd_inspect, "config": cmd_config,
    "export": cmd_export,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job, ``kill``), raised in the main thread as Ctrl-C is, so that the same
    clean-up runs: processes the command started are stopped, temporary files removed, progress bars closed."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    launched = exit_with_parent() is not None  # a process started by a stage (--procs, torchrun ranks) ends with it
    # SIGTERM as Ctrl-C, for commands a person or a scheduler started: the processes a stage starts keep SIGTERM's
    # default, ending at once (torchrun stops a rank with it, which may be blocked in a collective, where a Python
    # handler would only run once the call returned)
    handle = (not launched and "LOCAL_RANK" not in os.environ and threading.current_thread() is threading.main_thread()
              and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    if handle:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        code = _run(args)
        # every rank finished together; after an error a rank may be alone, and leaving would wait for the others
        if code == 0 and "torch.distributed" in sys.modules:  # (the CLI imports torch only for commands that use it)
            from seed.devices import leave_process_group

            leave_process_group()
        return code
    finally:
        if handle:  # main() called in a longer-lived process (a test, a script) leaves SIGTERM as it found it
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run(args: argparse.Namespace) -> int:
    """The command, with user mistakes, interruptions and the machine's errors as one line and an exit code."""
    try:
        return COMMANDS[args.command](args)
    except MachineError as exc:  # the machine's failure (a process it started crashed, a full disk), not the user's
        sys.stderr.write(f"seed: error: {exc}\n")  # one write: ranks share a pipe
        return 1
    except SeedError as exc:
        sys.stderr.write(f"seed: error: {exc}\n")  # one write: ranks share a pipe
        return 2
    except KeyboardInterrupt as exc:
        how = "terminated" if isinstance(exc, Terminated) else "interrupted"
        left = INTERRUPTED.get(f"{args.command} {getattr(args, 'kind', '')}", INTERRUPTED.get(args.command, "re-run it"))
        print(f"seed: {how}; {left}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except OSError as exc:
        if exc.errno in PATH_MISTAKES:  # a path given (a flag, a storage root) that is not what was expected
            sys.stderr.write(f"seed: error: {exc}: {PATH_MISTAKES[exc.errno]}\n")
            return 2
        # the machine, not the user: a full disk, a lost mount, a refused connection
        sys.stderr.write(f"seed: error: {exc}; what was finished is kept, re-run once it is fixed\n")
        return 1
    except Exception as exc:
        if not _no_credentials(exc):
            raise
        sys.stderr.write(f"seed: error: object storage: {exc} (botocore {type(exc).__name__}); give credentials as "
                         "boto does (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, or "
                         "storage_options in storage.yaml)\n")
        return 2


def _no_credentials(exc: BaseException) -> bool:
    """Whether ``exc`` is botocore's word that no (or only part of the) credentials were found: the user's to
    give, said in one line (s3fs lets it through as it is)."""
    return type(exc).__module__.startswith("botocore") and type(exc).__name__ in ("NoCredentialsError",
                                                                                   "PartialCredentialsError")


PATH_MISTAKES = {  # errno: what the user is told, for an OSError that says a path given has the wrong shape (not
    # ENOENT, EACCES or EROFS: a vanished mount, an expired ticket or a disk remounted read-only are the machine's)
    errno.EISDIR: "expected a file there, not a directory",
    errno.ENOTDIR: "expected a directory there (or a path under one), not a file",
    errno.EEXIST: "expected nothing there, or a directory: a file is in the way",
    errno.ENAMETOOLONG: "the path is too long",
}


if __name__ == "__main__":
    sys.exit(main())
