#!/usr/bin/env python3
"""Run the Dockerfile's build stage without Docker.

CI machines have no Docker engine, but the image must ship the binaries CI tests.
This reads the Dockerfile and carries out its build stage here: each COPY from the
build context into a scratch directory standing in for the stage's WORKDIR, each RUN
with the stage's ARG and ENV values, in order. Then it checks every later stage's
COPY: files from the context must exist, and files taken from the build stage
(COPY --from=build) must be what the build produced.

The host's toolchain stands in for the rust image's; a different version is reported,
not fatal (the lock file fixes every dependency either way).

    scripts/dockerfile-build.py [--dockerfile Dockerfile] [--scratch target/dockerfile-build]

Only the instructions the project's Dockerfile uses are understood; any other one is
an error, so the emulation cannot silently drift from the file.
"""

import argparse
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Instructions of the runtime stage whose effect needs no check here (image set-up).
LATER_STAGE_INSTRUCTIONS = {"RUN", "COPY", "USER", "EXPOSE", "STOPSIGNAL", "CMD", "ENTRYPOINT", "ENV", "WORKDIR", "LABEL"}


def instructions(text):
    """(line number, INSTRUCTION, argument text) with continuations joined."""
    joined, start, out = "", None, []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not joined and (not stripped or stripped.startswith("#")):
            continue
        if joined and stripped.startswith("#"):
            continue
        if start is None:
            start = number
        if stripped.endswith("\\"):
            joined += stripped[:-1] + " "
            continue
        joined += stripped
        word, _, rest = joined.partition(" ")
        out.append((start, word.upper(), rest.strip()))
        joined, start = "", None
    return out


def substitute(text, values):
    def value(match):
        name = match.group(1) or match.group(2)
        return values.get(name, "")

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def copy_args(rest):
    words = shlex.split(rest)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, val = words.pop(0)[2:].partition("=")
        flags[key] = val
    return flags, words[:-1], words[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dockerfile", default=str(ROOT / "Dockerfile"))
    parser.add_argument("--scratch", default=str(ROOT / "target" / "dockerfile-build"))
    options = parser.parse_args()

    dockerfile = Path(options.dockerfile)
    scratch = Path(options.scratch)
    steps = instructions(dockerfile.read_text())

    global_args, stages, current = {}, [], None
    for number, word, rest in steps:
        if word == "FROM":
            words = rest.split()
            image = substitute(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            current = {"name": name, "image": image, "steps": []}
            stages.append(current)
        elif current is None:
            if word != "ARG":
                sys.exit(f"{dockerfile}:{number}: {word} before the first FROM")
            key, _, val = rest.partition("=")
            global_args[key] = val
        else:
            current["steps"].append((number, word, rest))

    build, later = stages[0], stages[1:]
    print(f"build stage {build['name']!r} from {build['image']}")
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    wanted = global_args.get("RUST_VERSION", "")
    if not rustc.startswith(f"rustc {wanted}"):
        print(f"note: the image pins Rust {wanted}; this machine has {rustc}")

    # A fresh context every run, but target/ survives as a local stand-in for the
    # layer cache (CI starts without one).
    source_root = scratch / "src"
    if source_root.exists():
        for entry in source_root.iterdir():
            if entry.name != "target":
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    source_root.mkdir(parents=True, exist_ok=True)

    # Every workspace member's manifest must be in the dependency layer: cargo
    # --locked quietly builds a workspace with a member missing.
    first_run = next(i for i, step in enumerate(build["steps"]) if step[1] == "RUN")
    copied = {
        source
        for _, word, rest in build["steps"][:first_run]
        if word == "COPY"
        for source in copy_args(rest)[1]
    }
    for manifest in sorted(ROOT.glob("crates/*/Cargo.toml")):
        relative = str(manifest.relative_to(ROOT))
        if relative not in copied:
            sys.exit(f"{dockerfile.name}: {relative} is not copied before the dependency build")

    workdir_in_image = None
    # Global ARGs are visible in a stage only once redeclared there, as in Docker.
    values = {}
    env = {k: v for k, v in os.environ.items() if k not in ("CARGO_TARGET_DIR", "RUSTFLAGS", "CARGO_BUILD_TARGET")}
    for number, word, rest in build["steps"]:
        where = f"{dockerfile.name}:{number}"
        if word == "WORKDIR":
            workdir_in_image = rest
        elif word == "ENV":
            key, _, val = rest.partition("=")
            values[key] = env[key] = substitute(val, values)
        elif word == "ARG":
            key, _, val = rest.partition("=")
            values.setdefault(key, global_args.get(key, val.strip('"')).strip('"'))
            env[key] = values[key]
        elif word == "COPY":
            flags, sources, dest = copy_args(rest)
            if flags:
                sys.exit(f"{where}: COPY flags {flags} in the build stage are not emulated")
            target = source_root / dest
            for pattern in sources:
                matches = sorted(glob.glob(str(ROOT / pattern)))
                if not matches:
                    sys.exit(f"{where}: COPY {pattern}: not in the build context")
                for match in matches:
                    match = Path(match)
                    if match.is_dir():
                        # As in Docker: a directory's contents, not the directory.
                        shutil.copytree(match, target, dirs_exist_ok=True, copy_function=shutil.copy2)
                    else:
                        several = dest.endswith("/") or len(sources) > 1 or len(matches) > 1
                        into = target / match.name if several else target
                        into.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(match, into)
            print(f"{where}: COPY {' '.join(sources)} {dest}")
        elif word == "RUN":
            command = rest
            print(f"{where}: RUN {command}", flush=True)
            result = subprocess.run(["sh", "-c", command], cwd=source_root, env=env)
            if result.returncode != 0:
                sys.exit(f"{where}: RUN failed with exit code {result.returncode}")
        else:
            sys.exit(f"{where}: {word} is not emulated in the build stage")
    if workdir_in_image is None:
        sys.exit("the build stage sets no WORKDIR")

    # Every later COPY must find what it names.
    checked = 0
    for stage in later:
        for number, word, rest in stage["steps"]:
            if word not in LATER_STAGE_INSTRUCTIONS:
                sys.exit(f"{dockerfile.name}:{number}: {word} in a later stage is not checked")
            if word != "COPY":
                continue
            flags, sources, _ = copy_args(rest)
            if set(flags) - {"from"}:
                sys.exit(f"{dockerfile.name}:{number}: COPY flags {flags} are not checked")
            for source in sources:
                if flags.get("from") == build["name"]:
                    relative = os.path.relpath(source, workdir_in_image)
                    path = source_root / relative
                else:
                    path = ROOT / source
                if not path.exists():
                    sys.exit(f"{dockerfile.name}:{number}: COPY {source}: nothing there after the build")
                if path.is_dir():
                    names = sorted(p.name for p in path.iterdir())
                    print(f"{dockerfile.name}:{number}: {source} holds {', '.join(names)}")
                checked += 1
    print(f"dockerfile build: ok ({checked} COPY sources of later stages present)")


if __name__ == "__main__":
    main()
