"""Our checkpoint folder: config.json + model.safetensors + tokenizer.json.

`write_safetensors` streams tensors into one file (the header is computed up front from the
shapes), so converting or saving never holds more than one tensor beyond what the caller holds.
`load_model` builds on the meta device and assigns every tensor strictly.
"""
import json
import os
import struct
from collections.abc import Iterable

import torch

from model.config import Sa2VAConfig
from model.sa2va import Sa2VAModel

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def write_safetensors(path: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[tuple[str, torch.Tensor]]):
    """Write a .safetensors file whose tensors arrive one by one, in the order of `specs`.

    Writes to path + '.partial' and renames at the end, so a failure never leaves a file that
    looks complete.
    """
    header, offset = {}, 0
    for name, dtype, shape in specs:
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
    tmp = path + ".partial"
    order = iter(specs)
    try:
        _write(tmp, blob, order, tensors, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def _write(tmp, blob, order, tensors, path):
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, t in tensors:
            exp_name, exp_dtype, exp_shape = next(order)
            if (name, t.dtype, tuple(t.shape)) != (exp_name, exp_dtype, tuple(exp_shape)):
                raise RuntimeError(f"tensor {name} {t.dtype} {tuple(t.shape)} does not match its planned "
                                   f"{exp_name} {exp_dtype} {tuple(exp_shape)}")
            f.write(memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
            del t  # free it before the producer makes the next one
        if next(order, None) is not None:
            raise RuntimeError(f"{path}: fewer tensors arrived than planned")


ST_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


class SafetensorsReader:
    """Reads single tensors of a .safetensors file with pread into fresh memory.

    Unlike a whole-file mmap (safe_open), pages already read are not kept mapped, so streaming
    a large checkpoint tensor by tensor holds about one tensor at a time.
    """

    def __init__(self, path: str):
        self.path = path
        if os.path.isdir(path):
            raise ValueError(f"checkpoint file {path} is a folder, not a .safetensors file")
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ValueError(f"checkpoint file {path} is missing") from None
        except OSError as e:  # a symlink loop, no permission, ...
            raise ValueError(f"checkpoint file {path} cannot be opened ({e.strerror})") from None
        try:
            size = os.fstat(self._fd).st_size
            (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, n, 8))
            header.pop("__metadata__", None)
            self._start = 8 + n
            ends = [v["data_offsets"][1] for v in header.values()]
            if self._start + max(ends, default=0) > size:
                raise ValueError("truncated")
            self._entries = {k: (ST_DTYPES[v["dtype"]], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()}
        except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError, MemoryError, OverflowError) as e:
            os.close(self._fd)
            self._fd = None
            raise ValueError(f"checkpoint file {path} is corrupt or not safetensors ({e}); re-download or re-convert it") from None

    def keys(self) -> list[str]:
        return list(self._entries)

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def read(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[key]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        got = os.preadv(self._fd, [buf.numpy()], self._start + begin) if end > begin else 0
        if got != end - begin:
            raise ValueError(f"checkpoint file {self.path} ended early while reading {key}; the file is truncated")
        return buf.view(dtype).reshape(shape)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


def check_keys(expected: dict[str, tuple], got: dict[str, tuple], what: str):
    """Both dicts map key -> shape. Raise a one-line error naming missing/unexpected/mis-shaped keys."""
    def few(keys):
        keys = sorted(keys)
        return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
    missing = expected.keys() - got.keys()
    extra = got.keys() - expected.keys()
    if missing or extra:
        parts = ([f"missing {len(missing)}: {few(missing)}"] if missing else []) + \
                ([f"unexpected {len(extra)}: {few(extra)}"] if extra else [])
        raise ValueError(f"{what}: " + "; ".join(parts))
    bad = [k for k in expected if tuple(expected[k]) != tuple(got[k])]
    if bad:
        k = sorted(bad)[0]
        raise ValueError(f"{what}: {len(bad)} tensors have the wrong shape, e.g. {k} is {tuple(got[k])}, "
                         f"the model expects {tuple(expected[k])}")


def build_model(cfg: Sa2VAConfig, device="meta") -> Sa2VAModel:
    with torch.device(device):
        return Sa2VAModel(cfg)


def model_shapes(cfg: Sa2VAConfig) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}


def load_model(path: str, device="cpu", dtype: torch.dtype | None = None) -> Sa2VAModel:
    """A folder of ours: build on meta, read every tensor (cast to dtype if given), assign strictly."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path} has no config.json; is it a folder written by convert.py?")
    cfg = Sa2VAConfig.load(cfg_path)
    f = SafetensorsReader(os.path.join(path, "model.safetensors"))
    check_keys(model_shapes(cfg), {k: f.shape(k) for k in f.keys()}, f"{path}/model.safetensors")
    return load_tensors(cfg, ((k, f.read(k)) for k in f.keys()), device, dtype, f"{path}/model.safetensors")


def load_tensors(cfg: Sa2VAConfig, tensors: Iterable[tuple[str, torch.Tensor]], device="cpu",
                 dtype: torch.dtype | None = None, what: str = "checkpoint") -> Sa2VAModel:
    """Build on meta and assign every (name, tensor) strictly, each cast to dtype (if floating)
    and moved to device as it arrives, so at most one extra tensor is held at a time. Tensors
    that are not floating point, or hold NaN or inf, are named in the error."""
    model = build_model(cfg)
    sd, not_float, not_finite = {}, [], []
    for k, t in tensors:
        if not t.is_floating_point():
            not_float.append(f"{k} ({str(t.dtype).removeprefix('torch.')})")
        elif not bool(torch.isfinite(t).all()):
            not_finite.append(k)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        sd[k] = t.to(device)
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, {k: tuple(v.shape) for k, v in sd.items()}, what)
    for problem, names in (("are not float tensors", not_float), ("hold NaN or inf", not_finite)):
        if names:
            raise ValueError(f"{what}: {len(names)} tensor(s) {problem}: {', '.join(names[:5])}"
                             f"{' ...' if len(names) > 5 else ''}; the checkpoint is damaged, re-convert or re-download it")
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
