"""The typed key of one compiled part of the program (ProgramKind), and a selection of them (Programs): which
an engine compiles at start (Engine.compile), the rest compiling on first use. No JAX here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from enum import StrEnum


class Part(StrEnum):
    noise = "noise"  # seeds -> each row's starting noise
    encode = "encode"  # the VAE encoder: init images -> latents
    begin = "begin"  # text encoders and the starting sample
    advance = "advance"  # a chunk of denoising steps
    finish = "finish"  # the VAE decode
    preview = "preview"  # one row's denoised estimate drawn small by the preview decoder (TAESD: previews.py)


class Pixels(StrEnum):
    """What finish hands back."""

    uint8 = "uint8"  # NHWC bytes: serving (4x less to copy off the device)
    float32 = "float32"  # NHWC in [0, 1]: parity checks


class Role(StrEnum):
    """Which of an engine's models a program runs."""

    base = "base"
    refiner = "refiner"


@dataclass(frozen=True)
class ProgramKind:
    """One compiled part for a shape. guided: begin/advance with two UNet rows per image (classifier-free
    guidance), else one; output: finish's; adapted: begin/advance taking the LoRA bank (the base's only);
    controlled: advance running the engine's ControlNets (the base's only); imaged: begin/advance with the engine's
    IP-Adapters' keys and values beside the text's (the base's only)."""

    part: Part
    guided: bool = True
    output: Pixels = Pixels.uint8
    model: Role = Role.base
    adapted: bool = False
    controlled: bool = False
    imaged: bool = False

    def __post_init__(self) -> None:
        for name, kind in (("part", Part), ("output", Pixels), ("model", Role)):  # "float32" -> Pixels.float32
            object.__setattr__(self, name, kind(getattr(self, name)))
        pair = self.part in (Part.begin, Part.advance)
        if (not pair and (not self.guided or self.adapted)) or (
            self.part is not Part.finish and self.output != "uint8"
        ):
            raise ValueError(f"{self!r}: guided and adapted are begin/advance's, output is finish's")
        if self.model is Role.refiner and (
            self.part in (Part.noise, Part.encode, Part.preview) or self.adapted or self.controlled
        ):
            raise ValueError(f"{self!r}: the refiner has its own begin, advance and finish only")
        if self.controlled and self.part is not Part.advance:
            raise ValueError(f"{self!r}: only advance runs ControlNets")
        if self.imaged and (not pair or self.model is Role.refiner):
            raise ValueError(f"{self!r}: only the base's begin and advance run IP-Adapters")

    def __str__(self) -> str:
        """Its name in logs, compile_s and cache files: begin, advance-free, finish-uint8, refiner-begin, ..."""
        name = str(self.part)
        if self.part is Part.finish:
            name += f"-{self.output}"
        elif not self.guided:
            name += "-free"
        if self.model is Role.refiner:
            name = f"refiner-{name}"
        name += ("-lora" if self.adapted else "") + ("-control" if self.controlled else "")
        return name + ("-image" if self.imaged else "")


class Programs(enum.Flag):
    """Which programs Engine.compile builds at start; the others compile on first use."""

    guided = enum.auto()  # begin and advance with guidance (and the starting noise)
    free = enum.auto()  # the guidance-free begin and advance (and the starting noise)
    encode = enum.auto()  # the VAE encoder: image-to-image and inpainting
    adapters = enum.auto()  # the adapter-taking begin/advance beside the plain ones (an engine with a bank)
    refiner = enum.auto()  # the refiner's begin, advance and finish (an engine with one)
    controls = enum.auto()  # the ControlNet-running advance beside the plain ones (an engine serving ControlNets)
    images = enum.auto()  # the IP-Adapter begin and advance beside the plain ones (an engine serving IP-Adapters)
    uint8 = enum.auto()  # the decode to bytes (serving)
    float32 = enum.auto()  # the decode to float32 (parity checks)
    previews = enum.auto()  # the preview decoder's program (an engine serving TAESD; the base's and refiner's)
    NONE = 0
    SERVED = guided | free | encode | adapters | refiner | controls | images | uint8 | previews

    def kinds(
        self,
        refiner: bool = False,
        adapters: bool = False,
        controls: bool = False,
        images: bool = False,
        previews: bool = False,
    ) -> list[ProgramKind]:
        """The kinds this selection compiles for one shape, for an engine with or without a refiner, a bank,
        ControlNets, IP-Adapters and a preview decoder."""
        pairs = [g for g, flag in ((True, Programs.guided), (False, Programs.free)) if flag in self]
        outputs = [
            o for o, flag in ((Pixels.uint8, Programs.uint8), (Pixels.float32, Programs.float32)) if flag in self
        ]
        out = [ProgramKind(Part.noise)] if pairs else []
        roles = [Role.base] + ([Role.refiner] if refiner and Programs.refiner in self else [])
        for role in roles:  # the refiner has no image input
            out += [ProgramKind(part, g, model=role) for g in pairs for part in (Part.begin, Part.advance)]
            out += [ProgramKind(Part.encode)] if role is Role.base and Programs.encode in self else []
            out += [ProgramKind(Part.finish, output=o, model=role) for o in outputs]
        if adapters and Programs.adapters in self:
            out += [ProgramKind(part, g, adapted=True) for g in pairs for part in (Part.begin, Part.advance)]
        if controls and Programs.controls in self:
            lora = [False, True] if adapters and Programs.adapters in self else [False]
            out += [ProgramKind(Part.advance, g, adapted=a, controlled=True) for g in pairs for a in lora]
        if images and Programs.images in self:
            lora = [False, True] if adapters and Programs.adapters in self else [False]
            control = [False, True] if controls and Programs.controls in self else [False]
            out += [ProgramKind(Part.begin, g, adapted=a, imaged=True) for g in pairs for a in lora]
            out += [
                ProgramKind(Part.advance, g, adapted=a, controlled=c, imaged=True)
                for g in pairs
                for a in lora
                for c in control
            ]
        return out + ([ProgramKind(Part.preview)] if previews and Programs.previews in self else [])
