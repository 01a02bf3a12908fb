"""LoRA adapters: reading adapter files, and the device-resident bank the compiled program reads them from.

An adapter adds a low-rank term to some Linear layers: y = W x + scale * (alpha / rank) * up(down(x)). Which
layers: the ones kohya's trainer and diffusers' PEFT integration adapt in SDXL, every Linear of the UNet's
transformers (proj_in, the attentions' q/k/v/out, the feed-forward) and of the text encoders' blocks
(q/k/v/out_proj, fc1, fc2). Convolution adapters (LoCon, LoHa) and DoRA are refused by name.

Reading a file is common/lora_format.py's, shared with the API's registry (so a file the worker cannot apply is
refused when a job names it): kohya's layout (`lora_unet_<module>` in the original SDXL naming or diffusers',
`lora_te1_` / `lora_te2_`, `.alpha` scalars) and diffusers'/PEFT's (`unet.` / `text_encoder.` / `text_encoder_2.`,
`lora_A` / `lora_B` and the older `.lora.down`, `lora_linear_layer` and attention-processor names, alpha from the
PEFT config diffusers writes into the header). Here each of its layers is mapped onto this model's targets and its
factors read, alpha/rank folded into `up`.

How adapters run without compiling (worker/engine/layers.py, Linear): the program takes a bank of `slots`
adapters per layer, down (slots + 1, rank, in) and up (slots + 1, out, rank), slot 0 all zeros, each adapter
zero-padded to the bank's rank with alpha/rank folded into `up`; and per row up to `per_row` (slot, scale)
pairs. Loading an adapter writes its slot (one small compiled update, the same for every adapter); rows of one
batch may use different adapters. Why per-row factors and not weights merged per adapter set: on the
benchmark's CPU run (bench/lora.py, docs/benchmarks.md), a bank kept 0.91x of the no-adapter throughput,
weights merged per adapter 0.44x.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from common import lora_format
from worker.engine import convert, single_file, tensor_file

PARTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
Key = tuple[str, tuple[str, ...]]  # (component, module path in our naming)


class AdapterError(ValueError):
    """An adapter that cannot be used with this model; the message names the adapter and what is wrong."""


@dataclass(frozen=True)
class Target:
    """A Linear layer adapters may touch: its component, module path, and widths."""

    part: str
    path: tuple[str, ...]
    fan_in: int
    fan_out: int


def targets(model: Any) -> dict[Key, Target]:
    """Every Linear an adapter may touch in `model` (a worker.engine.model.Model), from its parameter shapes."""
    out: dict[Key, Target] = {}
    for part in PARTS:
        if part not in model.configs.parts:
            continue
        shapes = model.params[part] if model.params is not None else model.configs.module(part, np.float32).shapes()
        for path, leaf in convert.flatten(shapes).items():
            *module, name = path
            if name != "kernel" or len(leaf.shape) != 2:
                continue
            adapted = (
                any(m.startswith("attentions_") for m in module)
                if part == "unet"
                else any(m in ("self_attn", "mlp") for m in module)
            )
            if adapted:
                out[(part, tuple(module))] = Target(part, tuple(module), int(leaf.shape[0]), int(leaf.shape[1]))
    return out


def names(model: Any, found: Sequence[Key]) -> dict[str, Key]:
    """Every name a file may give a target's module (without the factor suffix) -> the target."""
    sgm = {}  # diffusers' UNet module prefix -> the original SDXL (sgm) one, e.g. down_blocks.1.attentions.0
    for ldm, diffusers, _ in single_file._unet_pairs(dataclasses.asdict(model.unet)):
        sgm[diffusers] = ldm
    out: dict[str, Key] = {}
    for key in found:
        part, path = key
        dotted = convert.pt_module(path)
        out[f"{part}.{dotted}"] = key  # diffusers/PEFT
        out[KOHYA_PREFIX[part] + "_".join(path)] = key  # kohya, diffusers' module names
        if part == "unet":
            for prefix, ldm in sgm.items():
                if dotted.startswith(prefix + "."):
                    out[KOHYA_PREFIX[part] + (ldm + dotted[len(prefix) :]).replace(".", "_")] = key
    return out


@dataclass(frozen=True)
class Adapter:
    """An adapter read for one model: per target, (down (rank, in), up (out, rank) with alpha/rank folded in)."""

    name: str
    sha256: str
    layout: str  # "kohya" or "diffusers"
    rank: int
    factors: dict[Key, tuple[np.ndarray, np.ndarray]]

    @property
    def parts(self) -> list[str]:
        return sorted({part for part, _ in self.factors})


def read(
    path: Path,
    name: str,
    model: Any,
    found: dict[Key, Target] | None = None,
    known: dict[str, Key] | None = None,
) -> Adapter:
    """Read an adapter file for `model`; AdapterError when it does not fit (naming the adapter). found, known:
    targets(model) and names() made once by the caller (an engine reads many adapters for one model)."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        layout = lora_format.read(Path(path))  # what the API's registry read too: names, ranks, alphas
        tensors = tensor_file.read(Path(path))
    except lora_format.AdapterFileError as exc:
        raise AdapterError(f"adapter {name!r}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"adapter {name!r}: not a readable safetensors file: {exc}") from None
    found = found if found is not None else targets(model)
    known = known if known is not None else names(model, list(found))
    unknown = sorted(stem for stem in layout.layers if stem not in known)
    if unknown:
        raise AdapterError(
            f"adapter {name!r}: {len(unknown)} layers this model does not have (an adapter for another model?), "
            f"e.g. {unknown[:3]}"
        )
    factors: dict[Key, tuple[np.ndarray, np.ndarray]] = {}
    for stem, layer in layout.layers.items():
        target = found[known[stem]]
        down = np.asarray(tensors[layer.down], np.float32)
        up = np.asarray(tensors[layer.up], np.float32)
        if down.ndim == 4 and down.shape[2:] == (1, 1) and up.ndim == 4 and up.shape[2:] == (1, 1):
            down, up = down[:, :, 0, 0], up[:, :, 0, 0]  # a 1x1 conv's factors on a Linear (proj_in/out)
        r = layer.rank
        if down.shape != (r, target.fan_in) or up.shape != (target.fan_out, r):
            raise AdapterError(
                f"adapter {name!r}: {stem} has factors {down.shape} and {up.shape}; this model's layer wants "
                f"(rank, {target.fan_in}) and ({target.fan_out}, rank): an adapter for another model?"
            )
        factors[known[stem]] = (down, up * np.float32(layer.scale))
    return Adapter(name, digest, layout.layout, layout.rank, factors)


class Bank:
    """Adapters resident on the devices, `slots` of them, least recently used evicted; see the module's docstring.

    `found`: the model's targets (targets()). `load(name)` returns an Adapter (it reads the file: the caller
    decides where names point, never a request).
    `choose(rows)` gives per-row (slots, scales) arrays for a batch, writing missing adapters into slots first."""

    def __init__(
        self,
        found: dict[Key, Target],
        load: Callable[[str], Adapter],
        rank: int,
        slots: int,
        per_row: int,
        dtype: Any,
        sharding: Any,
    ):
        if rank < 1 or slots < 1 or per_row < 1:
            raise ValueError(f"rank, slots and per_row must be at least 1, got {rank}, {slots}, {per_row}")
        self.load, self.rank, self.slots, self.per_row, self.dtype = load, rank, slots, per_row, dtype
        self.targets = found
        self.sharding = sharding
        zeros = {
            key: {
                "down": np.zeros((slots + 1, rank, t.fan_in), dtype),
                "up": np.zeros((slots + 1, t.fan_out, rank), dtype),
            }
            for key, t in self.targets.items()
        }
        self.tree = jax.device_put(self._nest(zeros), sharding)
        self._write = jax.jit(
            lambda tree, slot, values: jax.tree.map(lambda b, v: b.at[slot].set(v), tree, values),
            out_shardings=sharding,
        )
        self._resident: collections.OrderedDict[str, tuple[int, Adapter]] = collections.OrderedDict()
        # one batch's choice at a time (a worker may dispatch from two threads: the device loop, and the finisher
        # when it runs a failed batch's jobs one by one): no slot a batch chose is replaced before it is dispatched
        self._lock = threading.RLock()
        self.loads = 0  # adapters written into a slot (a switch)

    @staticmethod
    def slot_bytes(model: Any, rank: int, dtype: Any) -> int:
        """Device bytes one slot takes: rank * (in + out) per target."""
        return sum(rank * (t.fan_in + t.fan_out) for t in targets(model).values()) * np.dtype(dtype).itemsize

    def _nest(self, flat: dict[Key, dict[str, Any]]) -> dict[str, Any]:
        tree: dict[str, Any] = {}
        for (part, path), leaves in flat.items():
            node = tree.setdefault(part, {})
            for m in path:
                node = node.setdefault(m, {})
            node.update(leaves)
        return tree

    def warm(self) -> None:
        """Compile the slot write now (start-up), by writing zeros over slot 0."""
        values = {
            k: {"down": np.zeros((self.rank, t.fan_in), self.dtype), "up": np.zeros((t.fan_out, self.rank), self.dtype)}
            for k, t in self.targets.items()
        }
        self.tree = self._write(self.tree, np.int32(0), self._nest(values))

    def adapter(self, name: str) -> Adapter:
        """The adapter `name`, loaded and resident (evicting the least recently used); raises what load raises."""
        with self._lock:
            if name in self._resident:
                self._resident.move_to_end(name)
                return self._resident[name][1]
        return self._place(name)[1]

    def _place(self, name: str, keep: frozenset[str] = frozenset()) -> tuple[int, Adapter]:
        adapter = self.load(name)
        if adapter.rank > self.rank:
            raise AdapterError(f"adapter {name!r}: rank {adapter.rank} is above this worker's {self.rank}")
        with self._lock:
            if name in self._resident and self._resident[name][1].sha256 == adapter.sha256:
                self._resident.move_to_end(name)
                return self._resident[name]
            used = {slot for slot, _ in self._resident.values()}
            free = [s for s in range(1, self.slots + 1) if s not in used]
            if free:
                slot = free[0]
            else:
                victim = next((n for n in self._resident if n not in keep), None)
                if victim is None:
                    raise AdapterError(f"a batch needs more adapters at once than this worker's {self.slots} slots")
                slot, _ = self._resident.pop(victim)
            values = {}
            for key, t in self.targets.items():
                down = np.zeros((self.rank, t.fan_in), self.dtype)
                up = np.zeros((t.fan_out, self.rank), self.dtype)
                if key in adapter.factors:
                    d, u = adapter.factors[key]
                    down[: d.shape[0]], up[:, : u.shape[1]] = d, u
                values[key] = {"down": down, "up": up}
            # a new array: a batch still running on the old one is not disturbed (no buffer is donated)
            self.tree = self._write(self.tree, np.int32(slot), self._nest(values))
            self._resident[name] = (slot, adapter)
            self.loads += 1
            return slot, adapter

    def choose(
        self, chosen: Sequence[Sequence[tuple[str, float]]]
    ) -> tuple[np.ndarray, np.ndarray, list[list[Adapter]], Any]:
        """Per row, its (name, scale) adapters -> slots (rows, per_row) int32, scales (rows, per_row) float32, the
        adapters used (for the record: their hashes), and the bank's tree holding them (pass that one to the
        program: a later choice may replace slots in a newer tree)."""
        wanted = frozenset(name for row in chosen for name, _ in row)
        if len(wanted) > self.slots:
            raise AdapterError(f"a batch needs {len(wanted)} adapters at once; this worker has {self.slots} slots")
        slots = np.zeros((len(chosen), self.per_row), np.int32)
        scales = np.zeros((len(chosen), self.per_row), np.float32)
        used: list[list[Adapter]] = []
        with self._lock:
            for i, row in enumerate(chosen):
                if len(row) > self.per_row:
                    raise AdapterError(f"{len(row)} adapters on one row; at most {self.per_row}")
                mine = []
                for k, (name, scale) in enumerate(row):
                    hit = self._resident.get(name)
                    if hit is not None:
                        self._resident.move_to_end(name)
                    slot, adapter = hit if hit is not None else self._place(name, keep=wanted)
                    slots[i, k], scales[i, k] = slot, scale
                    mine.append(adapter)
                used.append(mine)
            return slots, scales, used, self.tree


def variables(tree: dict[str, Any], slots: jax.Array, scales: jax.Array) -> dict[str, Any]:
    """The "lora" collection of one component for Linear: the bank's factors with the rows' slots and scales."""

    def walk(node: dict[str, Any]) -> dict[str, Any]:
        if "down" in node:
            return {"down": node["down"], "up": node["up"], "slots": slots, "scales": scales}
        return {k: walk(v) for k, v in node.items()}

    return walk(tree)


def spec(bank: Bank) -> Any:
    """The bank's tree as shapes (for lowering the program ahead of time)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), bank.tree)
