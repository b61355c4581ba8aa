"""Command line: `python -m instantid_colab COMMAND`.

Each command is a thin call into the module that owns the concern; heavy imports happen inside
the command so that `doctor` works on a machine where diffusers or torch are broken.
"""

from __future__ import annotations

import argparse
import os
import sys

from instantid_colab import cli_errors


CONTROL_COMBINATIONS = {"+pose": ("pose",), "+pose+canny+depth": ("pose", "canny", "depth")}


def _doctor(args: argparse.Namespace) -> int:
    """Versions and problems need only the standard library; memory, the plan and the controls outlook
    need psutil, and are skipped with the reason when it is missing (a machine before `install`)."""
    import json

    from instantid_colab import colab_image, environment

    env = environment.report()
    problems, notes = environment.check(env), environment.untested(env)
    image, lock, versions = colab_image.load(), colab_image.load_lock(), environment.installed_versions()
    moved, unlocked = colab_image.differences(image, versions), colab_image.lock_differences(lock, versions)
    try:
        measured = _memory_outlook()
    except ImportError as error:
        measured = None
        missing = (f"Memory not measured: {error.name or error} is not installed. Run "
                   f"`{environment.INSTALL_HINT}`, then `doctor` again.")
    if args.json:
        environment_dict = {**env.to_dict(), "problems": [vars(problem) for problem in problems],
                            "notes": [vars(note) for note in notes]}
        report = {"environment": environment_dict, "memory": None, "plan": None, "controls": None, "identity_methods": None,
                  "colab_image": {"source": image.source, "python": image.python, "tested_image": not moved,
                                  "differences": [vars(difference) for difference in moved],
                                  "lock_differences": [vars(difference) for difference in unlocked]}}
        if measured is None:
            report["memory_error"] = missing
        else:
            snap, plan, outlook, identities = measured
            report.update(memory=snap.to_dict(), plan=plan.to_dict(),
                          controls={name: value if isinstance(value, str) else [vars(p) for p in value]
                                    for name, value in outlook.items()}, identity_methods=identities)
        print(json.dumps(report, indent=2))
    else:
        print(env.render(), "", *(problem.render() for problem in problems + notes), "", _image_lines(image, moved),
              _lock_lines(unlocked), "", sep="\n")
        if measured is None:
            print(missing)
        else:
            snap, plan, outlook, identities = measured
            lines = [f"{name}: " + (value if isinstance(value, str) else "; ".join(p.render() for p in value))
                     for name, value in outlook.items()]
            print(snap.render(), "", plan.render(), "", "Extra ControlNets (estimate, 1024x1024):", *lines, "",
                  "Identity methods (estimate):", *(f"{name}: {text}" for name, text in identities.items()), sep="\n")
        if not problems:
            print("\nNo problems found.")
    return 1 if any(problem.severity == "error" for problem in problems) else 0


def _image_lines(image, moved: list) -> str:
    """The Colab image the release was tested on, and what differs from it here (a bug report's first question)."""
    head = f"Tested on {image.describe()}."
    if not moved:
        return head + "\nThis runtime is that image: it has the image's versions of everything we use."
    return "\n".join([head, f"Here {len(moved)} differ from it:", *(f"  {d.render()}" for d in moved)])


def _lock_lines(unlocked: list) -> str:
    """Which additions differ from the versions CI proved on the image, and what that risks."""
    if not unlocked:
        return "The packages `install` added here are the versions tested on that image (or not installed yet)."
    return "\n".join([
        f"Here {len(unlocked)} of the packages `install` adds differ from the versions tested on that image:",
        *(f"  {d.render('tested')}" for d in unlocked),
        "  Risk: a combination CI has not run; it usually works. If face analysis, HEIC photos or the install fail, "
        "install the tested version (pip install NAME==VERSION, then restart the runtime)."])


def _memory_outlook():
    """(snapshot, plan, where extra ControlNets would go, what each identity method adds); ImportError when psutil
    is not installed."""
    from instantid_colab import controls, memory

    snap = memory.snapshot()
    plan = memory.plan_for_this_machine()
    combinations = {name: controls.options(kinds) for name, kinds in CONTROL_COMBINATIONS.items()}
    outlook = memory.controls_outlook(plan, combinations, snap.gpus[0].free_gib if snap.gpus else None,
                                      snap.ram_available_gib)
    return snap, plan, outlook, memory.identity_outlook(plan)


def _install(args: argparse.Namespace) -> int:
    """Every name given to --upgrade is checked before pip runs (exit 2 for torch & co. or a name not installed)."""
    from instantid_colab import environment, installer
    from instantid_colab.settings import SettingsError

    upgrade = [name.strip() for value in args.upgrade or () for name in value.split(",") if name.strip()]
    refused = installer.refusals(upgrade, environment.installed_versions())
    if refused:
        raise SettingsError(refused)
    result = installer.install(dry_run=args.dry_run, dev=args.dev, upgrade=upgrade, resolve=args.resolve)
    print(result.render())
    return 0 if result.ok else 1


def _inspect(args: argparse.Namespace) -> int:
    """Read an adapter file's architecture from its shapes; exit 1 with the reason if SDXL InstantID cannot use it."""
    import json

    from instantid_colab.adapter import check_fits, inspect_adapter

    info = inspect_adapter(args.path)
    check_fits(info)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0
    widths = sorted(set(info.ip_hidden_sizes))
    print(f"{info.path}: InstantID adapter ({info.file_format}, {info.dtype}, {info.n_tensors} tensors, {info.n_params:,} parameters)")
    print("  Resampler: " + ", ".join(f"{key}={value}" for key, value in info.to_dict()["resampler"].items()))
    print(f"  IP layers: {info.ip_layers} (widths {widths}), cross_attention_dim {info.cross_attention_dim}: fits SDXL")
    return 0


def _weights(args: argparse.Namespace, loras: tuple[str, ...] = ()):
    """Smoke weights, or the real ones (downloaded when missing), with `loras` on disk; MissingWeightsError
    propagates."""
    return _weights_request(args, loras).resolve()


def _weights_request(args: argparse.Namespace, loras: tuple[str, ...] = ()):
    from instantid_colab.weights_request import WeightsRequest

    return WeightsRequest(smoke=args.smoke, weights_dir=args.weights_dir, base=args.base, drive=args.drive, loras=loras)


def _download(args: argparse.Namespace) -> int:
    """Fetch what is missing; `--force FILE` deletes a damaged file first so it is fetched again."""
    from pathlib import Path

    from instantid_colab.weights import default_root, ensure_weights, forget

    root = Path(args.weights_dir).expanduser() if args.weights_dir else default_root(args.drive)
    for path in forget(args.force or (), root):
        print(f"deleted {path}: fetched again now, or, if `download` does not fetch it (an extra ControlNet, an "
              "annotator, a LoRA), the next time it is needed")
    weights = ensure_weights(root, base=args.base, drive=args.drive)
    for name in ("base", "controlnet", "adapter", "face_root", "vae"):
        print(f"{name:10} {getattr(weights, name)}")
    return 0


def _generation_values(args: argparse.Namespace) -> dict:
    """`pipeline.generate`'s keyword arguments from the command line (checked by `settings.check`)."""
    values = {name: getattr(args, name) for name in (
        "style", "identitynet_strength", "adapter_strength", "steps", "guidance_scale", "scheduler", "width", "height",
        "num_images", "enhance_non_face", "negative_noise", "combine", "lcm", "init_strength", "speed", "identity",
        "s_scale")}
    values["init_image"] = args.init_image
    if args.smoke and args.width is None and args.height is None:
        from instantid_colab.smoke import SMOKE_SIZE

        values["width"] = values["height"] = SMOKE_SIZE
    return values


def _controls(args: argparse.Namespace) -> list:
    """--control / --control-map / --control-range, checked, with every picture opened once (fails fast)."""
    from instantid_colab import controls

    given = [controls.parse_control(text) for text in args.control or ()]
    given += [controls.parse_control(text, is_map=True) for text in args.control_map or ()]
    checked = controls.check_controls(controls.with_ranges(given, [controls.parse_range(t) for t in args.control_range or ()]))
    return [controls.Control(c.kind, controls.source_image(c), c.strength, c.start, c.end, c.is_map) for c in checked]


def _with_settings_file(args: argparse.Namespace) -> argparse.Namespace:
    """The command line again with a settings file's values as its defaults (what is typed still wins)."""
    if not args.settings:
        return args
    from instantid_colab import settings_files

    parser = build_parser()
    command = parser.commands[args.command]
    command.set_defaults(**settings_files.command_line_defaults(settings_files.read(args.settings), command,
                                                                  args.settings))
    again = parser.parse_args(args.argv)
    again.argv = args.argv
    return again


def _generate(args: argparse.Namespace) -> int:
    """Check everything a person typed (settings, pictures, destination) before loading any model."""
    import random

    args = _with_settings_file(args)

    from instantid_colab import loras, memory, outputs, pipeline, settings, speed
    from instantid_colab.faces import Likeness
    from instantid_colab.images import open_image
    from instantid_colab.png_metadata import save_png

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    people, order = _people(args)
    values = settings.check(speed.with_preset({**_generation_values(args), "seed": seed, "pose_image": args.pose,
                                               "several_people": bool(people), "refine_face": args.refine_face}))
    for checked_only in ("seed", "pose_image", "several_people", "refine_face"):
        del values[checked_only]
    settings.check_arguments(refine_strength=(args.refine_face, "refine_strength"))
    values["guidance_interval"] = speed.parse_interval(args.guidance_interval)
    if args.face is None and not args.smoke and not people:
        raise settings.SettingsError(["--face is required: a photo with one clearly visible face (or --person, once "
                                      "per person, for 2 to 4 people)"])
    if people or args.face is not None:
        face = open_image(args.face, "face photo") if args.face is not None else None
    else:
        from instantid_colab.smoke import sample_face_image

        face = sample_face_image()
    extra_faces = [open_image(path, "extra face photo") for path in args.extra_face or ()]
    pose = open_image(args.pose, "pose image") if args.pose else None
    control_list = _controls(args)
    lora_list = loras.check_loras([loras.parse_lora(text) for text in args.lora or ()])
    values["init_image"] = open_image(args.init_image, "start photo") if args.init_image else None
    paths, renamed = outputs.plan_outputs(args.out, values["num_images"], args.overwrite)

    weights = _weights(args)
    for lora in lora_list:  # a missing or undownloadable LoRA is reported before the models load
        pipeline.lora_file(weights, lora.name)
    recorder = memory.StageRecorder() if args.memory else None
    session = pipeline.load_pipeline(weights, recorder=recorder)
    result = pipeline.generate(session, face, args.prompt, negative_prompt=args.negative_prompt, seed=seed,
                               pose_image=pose, extra_face_images=extra_faces, controls=control_list, loras=lora_list,
                               people=people, order=order, **values)
    if args.refine_face is not None:
        from instantid_colab import refine

        refine.refine_faces(session, result, args.refine_face, face_image=face, extra_face_images=extra_faces,
                            people=people)
    for image, path in zip(result.images, paths):
        save_png(image, path, overwrite=args.overwrite)
    _print_notices(result.label, renamed, result.notices)
    if recorder is not None:
        print(recorder.render())
    print(f"seed {result.seed}  {result.seconds:.1f} s  plan {result.plan.placement}")
    for control in result.settings["controls"]:
        print(f"control {control['kind']} ({control['source']}, {control['model']}): strength {control['strength']}, "
              f"steps {control['start']:.0%}-{control['end']:.0%}")
    for lora in result.settings["loras"]:
        print(f"LoRA {lora['name']} x {lora['scale']}")
    for index, refined in enumerate(result.refined):
        print(f"image {index + 1}: refined {refined['faces']} face{'s' if refined['faces'] != 1 else ''} at strength "
              f"{refined['strength']} (likeness before: {refined['identity_similarity_before']})")
    for index in result.best_first():
        print(f"  {result.likeness[index].render():<52} saved {paths[index]}")
        for number, person in enumerate(result.image_metadata(index).get("people", ()), 1):
            score = Likeness(person["identity_similarity"], person["identity_similarity_note"])
            print(f"    person {number} ({person['photos']} photo{'s' if person['photos'] > 1 else ''}, face box "
                  f"{person['face_box']}): {score.render()}")
    return 0


def _print_notices(label: str | None, renamed: str | None, notices: list[str]) -> None:
    """What a run says before its results: the smoke label, a kept file's new name, the pipeline's notices."""
    if label:
        print(f"[{label}]")
    for notice in ([renamed] if renamed else []) + notices:
        print(f"notice: {notice}")


def _people(args: argparse.Namespace) -> tuple[list, list[int] | None]:
    """--person (2 to 4 times), --person-mask, --order: checked, every photo opened (fails fast)."""
    from instantid_colab import people
    from instantid_colab.settings import SettingsError

    if not args.person:
        if args.person_mask or args.order:
            raise SettingsError(["--person-mask and --order need --person (once per person)"])
        return [], None
    problems = []
    if args.face is not None or args.extra_face:
        problems.append("give --face (one person, with --extra-face photos) or --person (2 to 4 people), not both")
    if len(args.person) == 1:
        problems.append("--person is given once per person, 2 to 4 times; for one person use --face")
    if problems:
        raise SettingsError(problems)
    return people.from_text(args.person, args.person_mask, args.order, has_layout=args.pose is not None)


def _swap(args: argparse.Namespace) -> int:
    """Check the settings, both photos and the destination before loading; then swap and save."""
    from instantid_colab import outputs, pipeline, refine, settings
    from instantid_colab.images import open_image
    from instantid_colab.png_metadata import save_png

    values = settings.check({name: getattr(args, name) for name in (
        "style", "identitynet_strength", "adapter_strength", "steps", "guidance_scale", "scheduler")}
        | {"seed": args.seed})
    settings.check_arguments(strength=(args.strength, "init_strength"), which=(args.which, "which_face"))
    target = open_image(args.photo, "target photo", max_side=None)
    face = open_image(args.face, "face photo")
    (path,), renamed = outputs.plan_outputs(args.out, 1, args.overwrite)
    session = pipeline.load_pipeline(_weights(args))
    result = refine.swap(session, target, face, which=args.which, strength=args.strength, prompt=args.prompt,
                         negative_prompt=args.negative_prompt, **values)
    save_png(result.image, path, overwrite=args.overwrite)
    _print_notices(result.label, renamed, result.notices)
    print(f"swapped the face at {result.face_box} (strength {result.strength}, seed {result.seed}, {result.seconds:.1f} s): "
          f"{result.likeness.render()}")
    print(f"saved {path}")
    return 0


def _batch(args: argparse.Namespace) -> int:
    """Check every row, load once, make what results.jsonl lacks; `--gpus N` relaunches under accelerate, `--ray`
    makes the rows on Ray workers."""
    from instantid_colab import batch, pipeline
    from instantid_colab.settings import check_arguments
    from instantid_colab.weights import SMOKE_LABEL

    check_arguments(gpus=(args.gpus, "gpus"))
    _ray_arguments(args)
    _out_folder(args.out)
    if args.gpus > 1:
        return _launch_on_gpus(args.gpus, args.argv)
    defaults = None
    if args.settings:
        from instantid_colab import settings_files

        defaults = settings_files.read(args.settings)
    rows = batch.prepare_rows(args.manifest, smoke=args.smoke, speed=args.speed, defaults=defaults)
    if args.ray is not None:
        from instantid_colab import cluster

        report = cluster.run_rows(rows, args.out, _weights_request(args, _loras_of(rows)), args.ray, args.ray_workers)
        label = SMOKE_LABEL if args.smoke else None
    else:
        process, processes = _this_process()
        session = pipeline.load_pipeline(_weights_for_rows(args, rows), progress=False)
        report = batch.run(session, rows, args.out, process=process, processes=processes)
        label = session.label
    if label:
        print(f"[{label}]")
    print(report.render())
    return _failed_rows(report)


def _failed_rows(report) -> int:
    """Exit 1 when rows failed in this run (each reason is in results.jsonl), else 0."""
    if not report.failed:
        return 0
    print(f"{report.failed} of {report.rows} rows failed: each line with \"status\": \"failed\" in "
          f"{report.out / 'results.jsonl'} says why; fix them and run the same command again", file=sys.stderr)
    return 1


def _out_folder(out: str) -> None:
    """A folder for a run's results, checked before anything loads (nothing is made here): SettingsError when `out`
    names a file, lies under a file, or under a folder this user cannot write in."""
    from pathlib import Path

    from instantid_colab.settings import SettingsError

    path = Path(out).expanduser()
    if path.is_file():
        raise SettingsError([f"--out {out} is a file; give a folder (it is made when missing)"])
    existing = next(parent for parent in (path, *path.absolute().parents) if parent.exists())
    if not existing.is_dir():
        raise SettingsError([f"--out {out}: {existing} is a file, not a folder; give a folder path"])
    if not os.access(existing, os.W_OK | os.X_OK) or not _writable(existing):
        raise SettingsError([f"--out {out}: cannot make or write folders in {existing} (no permission, or a "
                             "read-only place); give a folder you can write in"])


def _writable(folder) -> bool:
    """Whether a folder can really be made in `folder` (os.access says yes for root, and for /proc)."""
    import tempfile

    try:
        tempfile.TemporaryDirectory(dir=folder).cleanup()
    except OSError:
        return False
    return True


def _this_process() -> tuple[int, int]:
    """(this process, processes): (0, 1), or one of the processes `accelerate launch` started, on its own GPU."""
    if "LOCAL_RANK" not in os.environ:
        return 0, 1
    import torch
    from accelerate import PartialState

    state = PartialState()
    if state.device.type == "cuda":
        torch.cuda.set_device(state.device)
    return state.process_index, state.num_processes


def _weights_for_rows(args: argparse.Namespace, rows: list):
    """The weights, with every LoRA the rows name on disk (a missing one is reported before the models load)."""
    return _weights(args, _loras_of(rows))


def _loras_of(rows: list) -> tuple[str, ...]:
    return tuple(sorted({lora.name for row in rows for lora in row.values["loras"]}))


def _bench(args: argparse.Namespace) -> int:
    """Plan every image (people, prompts, grid, seeds: all checked), load once, make and score what results.jsonl
    lacks, then print the table; `--gpus N` relaunches under accelerate like batch."""
    from pathlib import Path

    from instantid_colab.settings import SettingsError, check_arguments

    check_arguments(gpus=(args.gpus, "gpus"), seeds=(args.seeds, "bench_seeds"))
    _ray_arguments(args)
    _out_folder(args.out)
    if args.faces is None and not args.smoke:
        raise SettingsError(["--faces is required: a folder with one photo per person, or one folder of photos per "
                             "person"])
    if args.gpus > 1:
        return _launch_on_gpus(args.gpus, args.argv)
    from instantid_colab import pipeline
    from instantid_colab.bench import run as bench

    if args.faces is None:
        plan = bench.plan_smoke_people(args.out, args.prompts, args.grid, args.seeds)
    else:
        plan = bench.plan(args.faces, args.prompts, args.grid, args.seeds, smoke=args.smoke)
    print(plan.describe(), flush=True)
    if bench.remaining(plan, args.out) == 0:  # nothing to make: no models to load
        from instantid_colab.weights import SMOKE_LABEL

        made = None
        summary, written = bench.report(plan, args.out, SMOKE_LABEL if args.smoke else None)
        print(f"All {len(plan.rows)} images are in {Path(args.out) / 'results.jsonl'}: nothing to make.")
    elif args.ray is not None:
        from instantid_colab import cluster
        from instantid_colab.weights import SMOKE_LABEL

        label = SMOKE_LABEL if args.smoke else None
        made = cluster.run_rows(plan.rows, args.out, _weights_request(args, _loras_of(plan.rows)), args.ray,
                                args.ray_workers, bench=plan, desc="bench")
        summary, written = bench.report(plan, args.out, label)
        print(*([f"[{label}]"] if label else []), made.render(), sep="\n")
    else:
        process, processes = _this_process()
        session = pipeline.load_pipeline(_weights_for_rows(args, plan.rows), progress=False)
        made, summary, written = bench.run(session, plan, args.out, process=process, processes=processes)
        print(*([f"[{session.label}]"] if session.label else []), made.render(), sep="\n")
    print("", summary.table_markdown(), "", *(f"{kind}: {path}" for kind, path in written.items()), sep="\n")
    return 0 if made is None else _failed_rows(made)


def _launch_on_gpus(gpus: int, argv: list[str], runner=None) -> int:
    """`accelerate launch --multi_gpu --num_processes N -m instantid_colab ...` with this command line minus --gpus."""
    import subprocess

    forwarded, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--gpus":
            skip = True
        elif not item.startswith("--gpus="):
            forwarded.append(item)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
               "-m", "instantid_colab", *forwarded]
    print("$ " + " ".join(command), flush=True)
    return (runner or subprocess.call)(command)


def _app(args: argparse.Namespace) -> int:
    from instantid_colab import app, pipeline
    from instantid_colab.settings import SettingsError, check_arguments

    check_arguments(port=(args.port, "port"))
    try:
        credentials = app.parse_auth(args.auth)
    except ValueError as error:
        raise SettingsError([f"--auth: {error}"]) from None
    if args.port is not None:
        app.check_port_free(args.port)  # before minutes of loading
    weights = _weights(args)
    app.launch(pipeline.load_pipeline(weights), share=args.share, auth=credentials, port=args.port,
               open_access=args.no_auth)
    return 0


def _weights_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights-dir", help="where weights live (default $INSTANTID_WEIGHTS or ~/.cache/instantid-colab)")
    from instantid_colab.weights import DEFAULT_BASE

    parser.add_argument("--base", default=DEFAULT_BASE, help="SDXL base repo (see weights.BASE_MODELS)")
    parser.add_argument("--drive", action="store_true", help="keep weights on the mounted Google Drive")


def _ray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="make the rows on Ray workers, one per GPU, each with its own loaded pipeline; this "
                             "process writes the results. ADDRESS: auto (the cluster this machine is in) or "
                             "ray://HOST:10001; none: a Ray started here on this machine's GPUs. Needs the ray extra: "
                             'pip install "instantid-colab[ray]"')
    parser.add_argument("--ray-workers", type=int, metavar="N",
                        help="how many Ray workers (default: one per GPU of the cluster; without GPUs, 1 on the CPU)")


def _ray_arguments(args: argparse.Namespace) -> None:
    """--ray's options checked before anything loads: exit 2 for a worker count out of range, --gpus beside it, or
    Ray not installed."""
    from instantid_colab.settings import SettingsError, check_arguments

    if args.ray_workers is not None:
        check_arguments(ray_workers=(args.ray_workers, "ray_workers"))
        if args.ray is None:
            raise SettingsError(["--ray-workers needs --ray"])
    if args.ray is not None:
        if args.gpus > 1:
            raise SettingsError(["give --ray (Ray workers, one per GPU) or --gpus N (accelerate on this machine), "
                                 "not both"])
        from instantid_colab.cluster import require_ray

        require_ray()


def _generate_options(generate: argparse.ArgumentParser) -> None:
    from instantid_colab.schedulers import SCHEDULERS
    from instantid_colab import engines
    from instantid_colab.settings import LIMITS, REFINE_STRENGTH
    from instantid_colab.speed import SPEEDS

    def limits(name: str, default: object) -> str:
        return f"{LIMITS[name].render()}; default {default}"

    generate.add_argument("--face", help="face photo (with --smoke: optional, a drawn smoke face)")
    generate.add_argument("--extra-face", action="append", help="more photos of the same person (repeatable)")
    generate.add_argument("--combine", default="average", help="average | norm_average | concat")
    generate.add_argument("--prompt", default="", help='empty: "a person" (the official default)')
    generate.add_argument("--negative-prompt", default=None)
    generate.add_argument("--style", default="No style")
    generate.add_argument("--out", default="outputs/instantid.png",
                          help="a .png file or a folder; an existing file is kept (the next free name is used)")
    generate.add_argument("--overwrite", action="store_true", help="replace existing files at --out")
    generate.add_argument("--seed", type=int, help="default: random (printed); " + LIMITS["seed"].render())
    generate.add_argument("--speed", default="quality", choices=list(SPEEDS), metavar="NAME",
                          help="a speed mode: " + ", ".join(SPEEDS) + " (each with the steps, guidance, sampler and "
                               "few-step LoRA its model card gives; default quality: 30 steps, guidance 5, Euler)")
    generate.add_argument("--steps", type=int, help=LIMITS["steps"].render() + "; default: the speed mode's")
    generate.add_argument("--guidance-scale", type=float,
                          help=LIMITS["guidance_scale"].render() + "; default: the speed mode's")
    generate.add_argument("--guidance-interval", metavar="START,END",
                          help="classifier-free guidance only on these fractions of the steps (e.g. 0.17,0.9); "
                               "outside them the unconditional half is not computed")
    generate.add_argument("--scheduler", help="default: the speed mode's (" + ", ".join(SCHEDULERS) + ")")
    generate.add_argument("--identity", default=engines.DEFAULT, choices=list(engines.METHODS),
                          help="the method that keeps the face (default " + engines.DEFAULT + ") " + engines.help_text())
    generate.add_argument("--s-scale", type=float, default=1.0,
                          help="faceid-plusv2's structure weight: " + limits("s_scale", 1.0))
    generate.add_argument("--identitynet-strength", type=float, default=0.8, help=limits("identitynet_strength", 0.8))
    generate.add_argument("--adapter-strength", type=float, default=0.8, help=limits("adapter_strength", 0.8))
    generate.add_argument("--width", type=int, help="multiple of 64, 64 to 1280 (with --height; default: from the photo)")
    generate.add_argument("--height", type=int)
    generate.add_argument("--num-images", type=int, default=1, help=limits("num_images", 1))
    generate.add_argument("--pose", help="take the face keypoints (and output size) from this photo; with --person, "
                                         "its faces place the people, left to right")
    generate.add_argument("--person", action="append", metavar="PHOTO[+PHOTO...]",
                          help="one person of several (2 to 4): their photo(s); each keeps their own face in their "
                               "own region. Without --pose the people stand side by side")
    generate.add_argument("--person-mask", action="append", metavar="MASK",
                          help="where each person goes (white), one per --person, in order (default: head and "
                               "shoulders around their face)")
    generate.add_argument("--order", metavar="N,N,...",
                          help="with --pose: the person for each face of the pose photo, left to right (e.g. 2,1)")
    generate.add_argument("--enhance-non-face", action=argparse.BooleanOptionalAction, default=True)
    generate.add_argument("--negative-noise", type=float, default=0.0, help=limits("negative_noise", 0.0))
    generate.add_argument("--lcm", action="store_true", help="the same as --speed lcm (LCM-LoRA, 5 steps, guidance 1.5)")
    generate.add_argument("--control", action="append", metavar="KIND=IMAGE[:STRENGTH]",
                          help="body pose, canny edges or depth taken from a photo (pose|canny|depth; strength "
                               f"{LIMITS['control_strength'].render()}, default 0.4; repeatable)")
    generate.add_argument("--control-map", action="append", metavar="KIND=IMAGE[:STRENGTH]",
                          help="an already drawn pose skeleton, edge map or depth map (repeatable)")
    generate.add_argument("--control-range", action="append", metavar="KIND=START:END",
                          help="the fraction of the steps a control acts in, e.g. pose=0:0.6 (default 0:1)")
    generate.add_argument("--lora", action="append", metavar="ID_OR_FILE[:SCALE]",
                          help="an SDXL LoRA: a .safetensors file or a hub id owner/name[/file.safetensors]; scale "
                               f"{LIMITS['lora_scale'].render()}, default 1; repeatable; `smoke` with --smoke")
    generate.add_argument("--init-image", help="start from this photo (img2img); the face still comes from --face")
    generate.add_argument("--init-strength", type=float, default=0.8,
                          help="how much of the start photo is repainted: " + limits("init_strength", 0.8))
    generate.add_argument("--refine-face", type=float, nargs="?", const=REFINE_STRENGTH, metavar="STRENGTH",
                          help="after the image is made, make each face again at full resolution through a 1024 "
                               f"crop and paste it back ({LIMITS['refine_strength'].render()}; {REFINE_STRENGTH} when "
                               "given alone)")
    generate.add_argument("--settings", metavar="FILE",
                          help="take the settings from this file (one bench wrote to its best_settings/ folder); "
                               "options typed here win")
    generate.add_argument("--memory", action="store_true", help="print the per-stage memory table")
    generate.add_argument("--smoke", action="store_true", help="tiny random weights (smoke: random weights), offline")


def build_parser() -> argparse.ArgumentParser:
    from instantid_colab.settings import LIMITS
    from instantid_colab.speed import SPEEDS

    parser = argparse.ArgumentParser(prog="python -m instantid_colab", description=__doc__,
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    parser.commands = {}  # name -> its parser (a settings file sets a command's defaults: `_with_settings_file`)

    def command(name: str, help: str, handler) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
        cli_errors.debug_option(sub)
        sub.set_defaults(handler=handler)
        parser.commands[name] = sub
        return sub

    doctor = command("doctor", "environment, memory and the memory plan", _doctor)
    doctor.add_argument("--json", action="store_true", help="one JSON object: environment, memory, plan")

    install = command("install", "add what is missing; change nothing that is installed", _install)
    install.add_argument("--dry-run", action="store_true", help="print the pip commands, change nothing")
    install.add_argument("--dev", action="store_true", help="also the test tools (the package's `dev` extra)")
    install.add_argument("--upgrade", action="append", metavar="NAME[,NAME]",
                         help="also upgrade these installed packages (never torch, torchvision, torchaudio, numpy); "
                              "restart the runtime afterwards; repeatable")
    install.add_argument("--resolve", action="store_true",
                         help="ignore the lock proven on Colab's image: let pip choose the newest releases that fit "
                              "what is installed")

    inspect = command("inspect", "read an InstantID adapter file's architecture", _inspect)
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true")

    download = command("download", "fetch the InstantID weights (skips what is on disk)", _download)
    download.add_argument("--force", action="append", metavar="FILE",
                          help="delete this damaged weight file and fetch it again (repeatable; the path an error named)")
    _weights_options(download)

    generate = command("generate", "make images from a face photo", _generate)
    _generate_options(generate)
    _weights_options(generate)

    swap = command("swap", "give a face in a photo another person's identity; the rest of the photo stays as it is",
                   _swap)
    swap.add_argument("--photo", required=True, help="the photo to change (any size; only the face's crop is generated)")
    swap.add_argument("--face", required=True, help="a photo of the person whose identity the face gets")
    swap.add_argument("--which", type=int, help="the face to change, counted from the left from 1 (default: the largest)")
    swap.add_argument("--strength", type=float, default=0.7,
                      help="how much of the face is repainted: " + LIMITS["init_strength"].render() + "; default 0.7")
    swap.add_argument("--prompt", default="", help='what the face region shows (empty: "a person")')
    swap.add_argument("--negative-prompt", default=None)
    swap.add_argument("--style", default="No style")
    swap.add_argument("--seed", type=int, default=42, help=LIMITS["seed"].render())
    swap.add_argument("--steps", type=int, default=30, help=LIMITS["steps"].render())
    swap.add_argument("--guidance-scale", type=float, default=5.0, help=LIMITS["guidance_scale"].render())
    swap.add_argument("--scheduler", default="Euler")
    swap.add_argument("--identitynet-strength", type=float, default=0.8, help=LIMITS["identitynet_strength"].render())
    swap.add_argument("--adapter-strength", type=float, default=0.8, help=LIMITS["adapter_strength"].render())
    swap.add_argument("--out", default="outputs/swap.png", help="a .png file or a folder; an existing file is kept")
    swap.add_argument("--overwrite", action="store_true", help="replace an existing file at --out")
    swap.add_argument("--smoke", action="store_true", help="tiny random weights (smoke: random weights), offline")
    _weights_options(swap)

    batch = command("batch", "many images from a manifest (CSV or JSONL), resumable, on one or several GPUs", _batch)
    batch.add_argument("manifest", help="CSV with a header row or JSONL; columns: face, prompt, style, seed, steps, "
                                        "identitynet_strength, adapter_strength, width, height, controls, loras, ... "
                                        "(README); missing columns take the defaults")
    batch.add_argument("--out", default="outputs/batch", help="folder for the PNGs, results.jsonl, contact_sheet.png")
    batch.add_argument("--gpus", type=int, default=1, help="start one process per GPU through accelerate launch")
    batch.add_argument("--speed", choices=list(SPEEDS), metavar="NAME",
                       help="the speed mode of rows without a speed column: " + ", ".join(SPEEDS))
    batch.add_argument("--settings", metavar="FILE",
                       help="the value of each column a row does not have, from this settings file (one bench wrote "
                            "to its best_settings/ folder)")
    batch.add_argument("--smoke", action="store_true", help="tiny random weights (smoke: random weights), offline")
    _weights_options(batch)
    _ray_options(batch)

    bench = command("bench", "identity benchmark: likeness, prompt-following and time for every setting, side by side",
                    _bench)
    bench.add_argument("--faces", metavar="DIR",
                       help="one photo per person, or one folder of photos per person; with two or more photos the "
                            "last in name order is held out (never given to the generator, likeness measured against "
                            "it). With --smoke: optional (drawn smoke faces)")
    bench.add_argument("--out", default="outputs/bench",
                       help="folder for the images, results.jsonl, table.md/.csv, the plot and the contact sheet")
    bench.add_argument("--prompts", default="builtin", metavar="SET_OR_FILE",
                       help="builtin (PuLID's protocol prompt and 21 varied ones, with sources), protocol (PuLID's "
                            "one prompt), or a text file, one prompt a line; default builtin")
    bench.add_argument("--grid", metavar="SPEC_OR_FILE",
                       help='settings to compare: "speed=quality,lightning-4; identitynet_strength=0.6,0.8; '
                            'guidance_interval=none,0.17:0.9" (every combination; none = the default), or a CSV/JSONL '
                            "file of configurations named by a `name` column; default: one setting, the defaults")
    bench.add_argument("--seeds", type=int, default=1,
                       help=f"{LIMITS['bench_seeds'].render()}; default 1")
    bench.add_argument("--gpus", type=int, default=1, help="start one process per GPU through accelerate launch")
    bench.add_argument("--smoke", action="store_true", help="tiny random weights (smoke: random weights), offline")
    _weights_options(bench)
    _ray_options(bench)

    app = command("app", "the gradio app", _app)
    app.add_argument("--smoke", action="store_true", help="tiny random weights (smoke: random weights), no download")
    app.add_argument("--share", action=argparse.BooleanOptionalAction, default=None,
                     help="public gradio link (default: on in Colab, off elsewhere)")
    login = app.add_mutually_exclusive_group()
    login.add_argument("--auth", metavar="USER:PASS",
                       help="require this login (default with a share link: a random user and password, printed)")
    login.add_argument("--no-auth", action="store_true",
                       help="serve a share link without a login: anyone who sees the link can use your GPU")
    app.add_argument("--port", type=int, help="local port (default: gradio's, 7860 or the next free one)")
    _weights_options(app)
    return parser


EXIT_CODES = """exit codes: 0 done; 1 the run could not do what was asked (the message says why and what to do);
2 wrong command line or a value outside its range; 3 a bug (run again with --debug); 130 stopped with Ctrl-C"""


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a person can fix: bad values, files, faces, weights, memory (the pipeline's OutOfMemory is a
    MemoryError). Anything else is our bug. Only ground-floor modules: `install` runs before numpy exists."""
    from instantid_colab.weights import DamagedWeightsError, MissingWeightsError

    return (MemoryError, ValueError, FileNotFoundError, PermissionError, MissingWeightsError, DamagedWeightsError)


def main(argv: list[str] | None = None) -> int:
    from instantid_colab.settings import SettingsError

    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # what `batch --gpus N` hands on
    return cli_errors.run(args.handler, args, _user_errors(), usage_errors=(SettingsError,))


if __name__ == "__main__":
    sys.exit(main())
