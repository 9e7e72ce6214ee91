"""Checks the declared rust-version (Cargo.toml) as far as this machine can without a second
toolchain: no package in the locked dependency tree (every platform's, dev-dependencies too)
may declare a rust-version newer than ours; a package that declares none passes. Standard-library
items newer than ours are caught by clippy's incompatible_msrv, which reads the same field and
runs with warnings as errors in .ci/run (tests included, see clippy.toml). Language features are
not checked: that needs the old toolchain itself.

    cargo metadata --format-version 1 --locked | python3 .ci/rust-version.py
"""
import json
import sys


def version(text):
    return tuple(int(part) for part in text.split(".")[:3]) + (0,) * (3 - len(text.split(".")))


meta = json.load(sys.stdin)
resolved = {node["id"] for node in meta["resolve"]["nodes"]}
ours = next(p for p in meta["packages"] if p["id"] in meta["workspace_members"])
limit = version(ours["rust_version"])
newer = [
    f'{p["name"]} {p["version"]} declares rust-version {p["rust_version"]}'
    for p in meta["packages"]
    if p["id"] in resolved and p.get("rust_version") and version(p["rust_version"]) > limit
]
if newer:
    print(f'{ours["name"]} declares rust-version {ours["rust_version"]}, but:', *newer, sep="\n  ")
    sys.exit(1)
print(f'{len(resolved)} locked packages: none declares a rust-version newer than {ours["rust_version"]}')
