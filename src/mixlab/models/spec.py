"""Model specifications: write a new hybrid without writing a class.

A specification names a stem, then for each stage its spatial mixer, depth and width (and
how it downsamples), then the head. It is a mapping (from YAML or Python)::

    stem: {type: patch, size: 2}              # patch (kernel = stride) | conv (3x3/2 stack)
    stages:
      - {mixer: convnext, depth: 2, width: 32}
      - {mixer: convnext, depth: 2, width: 64}            # downsample: conv (default) | merge | none
      - {mixer: attention, depth: 2, width: 128, heads: 4}
      - {mixer: window, depth: 2, width: 256, heads: 8, window: 7}
    head: {pool: avg}                         # distilled: true adds DeiT's distillation token
    mlp_ratio: 4

or the same as one compact string, stages separated by ``/``, options after ``:``::

    patch2 / convnext:2x32 / convnext:2x64 / attention:2x128:heads=4 / window:2x256:heads=8,window=7

``create_model("spec:<string>")`` and ``create_model("path/to/spec.yaml")`` build one, and so
does every command that takes a model name. Mixers (each stage's blocks):

=============  ==================================================================  =========
mixer          block                                                               options
=============  ==================================================================  =========
attention      generic block, global multi-head self-attention                     heads
window         generic block, (shifted) window attention, Swin's alternation       heads, window
dwconv         generic block, depthwise convolution                                kernel
convnext       ConvNeXt's block (depthwise conv, LN, MLP, one residual)            kernel
pool           generic block, PoolFormer's pooling with GroupNorm(1)               pool
mlp            generic block, MLP-Mixer's token-mixing MLP (fixes the input size)  tokens_ratio
container      generic block, Container's α·attention + β·dwconv, BatchNorm, CPE   heads, kernel
conv_static    Container-Light's static block (dwconv between 1x1 projections)     kernel
basic          ResNet-18's block: two dense 3x3 convolutions, BatchNorm, ReLU
bottleneck     ResNet-50's block: 1x1, dense 3x3, 1x1 (width/4 inside), BatchNorm
=============  ==================================================================  =========

These ten are registered below, the other families' from their model files, all with
:func:`mixlab.registry.register_spec_mixer` (:data:`mixlab.registry.MIXERS` lists every one, with
its options and defaults). Every stage also takes ``mlp_ratio``, ``downsample``, ``pos`` and
``context``. A stage after the first
halves the resolution by ``downsample``: ``conv`` (LayerNorm + 2x2 stride-2 convolution,
ConvNeXt's way; the default), ``merge`` (Swin's patch merging), ``stride`` (ResNet's way: the
first block's 3x3 convolution strides by 2, with a projection shortcut; the default, and only
choice besides ``none``, for ``basic`` and ``bottleneck``) or ``none`` (same resolution and
width). ``pos`` adds a position encoding at the start of the stage: ``abs`` (a learned
absolute embedding, ViT's; resampled for other input sizes), ``cpe`` (a conditional one, a
3x3 depthwise convolution of the features) or ``none`` (the default). ``context`` appends a
global context module after the stage's blocks (one of :data:`mixlab.mixers.context.CONTEXT_MODULES`:
se, ge, ge_theta, ge_theta_global, bam, nonlocal, crisscross, gc, tree_filter; default ``none``), e.g.
``basic:2x80:context=gc``: any CNN written as a spec gets them, as ``resnet50`` does with ``context=``;
in a basic or bottleneck stage, ``context_placement=block`` puts one inside every block instead
(on the residual branch, before the addition: an SE-ResNet-18 is
``conv4 / basic:2x64:context=se,context_placement=block / ...``).
"""
from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from ..layers import (AbsolutePosEmbed, BatchNormNHWC, ClassifierHead, ConditionalPosEnc, ConvEmbed, ConvStem,
                      GroupNorm1NHWC, Mlp, PatchEmbed, PatchMerging, stochastic_depth_rates, to_2tuple)
from ..mixers import Attention, ContainerMixer, DepthwiseConv, Pooling, TokenMixingMLP, WindowAttention
from ..registry import MIXERS, register_spec_mixer
from .base import HierarchicalModel, Stage, TokenEncoder, init_weights_vit
from .blocks import MetaBlock
from .convnext import ConvNeXtBlock
from .resnet import BasicBlock, Bottleneck


class SpecError(ValueError):
    """A specification that cannot be built; the message says where and what would be right."""


STAGE_KEYS = {"mixer", "depth", "width", "downsample", "mlp_ratio", "pos", "context", "context_placement"}
CONTEXT_PLACEMENTS = ("stage", "block")
DOWNSAMPLES = ("conv", "merge", "stride", "none")
POS = ("none", "abs", "cpe")
STEMS = ("patch", "conv")
#: the largest stage width a specification may ask for (a 1x1 layer of this width holds 1.1e9 weights)
MAX_WIDTH = 32768
#: the largest stem size (patch side, or conv stride)
MAX_STEM = 1024


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML parser's error in one line: where (line, column) and what, for messages that name the file."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(e, "problem", None) or e).split())


def _scalar(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_spec(text: str) -> dict:
    """Parse the compact form ``stem / mixer:DEPTHxWIDTH[:key=value,...] / ...``."""
    parts = [p.strip() for p in text.split("/") if p.strip()]
    if len(parts) < 2:
        raise SpecError(f"spec {text!r}: expected a stem and at least one stage separated by '/', e.g. "
                        f"'patch4 / convnext:2x32 / attention:2x64:heads=2'")
    stem_txt = parts[0]
    for kind in STEMS:
        if stem_txt.startswith(kind) and stem_txt[len(kind):].isdigit():
            stem = {"type": kind, "size": int(stem_txt[len(kind):])}
            break
    else:
        raise SpecError(f"spec stem {stem_txt!r}: use patch<P> (a PxP patchify convolution) or conv<S> (3x3 "
                        f"stride-2 convolutions down to stride S), e.g. 'patch4'")
    stages = []
    for i, part in enumerate(parts[1:]):
        fields = part.split(":")
        if len(fields) < 2 or "x" not in fields[1]:
            raise SpecError(f"spec stage {i} {part!r}: expected mixer:DEPTHxWIDTH[:key=value,...], "
                            f"e.g. 'attention:2x128:heads=4'")
        depth, _, width = fields[1].partition("x")
        if not (depth.strip().isdigit() and width.strip().isdigit()):
            raise SpecError(f"spec stage {i} {part!r}: depth and width must be integers, as in '2x128'")
        stage = {"mixer": fields[0].strip(), "depth": int(depth), "width": int(width)}
        for opt in ":".join(fields[2:]).split(",") if len(fields) > 2 else []:
            if not opt.strip():
                continue
            key, eq, value = opt.partition("=")
            if not eq:
                raise SpecError(f"spec stage {i} {part!r}: option {opt!r} must look like key=value")
            stage[key.strip()] = _scalar(value.strip())
        stages.append(stage)
    return {"stem": stem, "stages": stages}


def load_spec(source) -> dict:
    """A specification from a mapping, a ``spec:`` / compact string, or a YAML file path."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    text = str(source)
    if text.startswith("spec:"):
        return parse_spec(text[5:])
    if text.endswith((".yaml", ".yml")):
        p = Path(text)
        if not p.is_file():
            raise SpecError(f"model specification file {text!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise SpecError(f"{text}: not valid YAML ({yaml_problem(e)})") from None
        if isinstance(data, str):
            return parse_spec(data)
        if not isinstance(data, dict):
            raise SpecError(f"{text}: a specification is a mapping with stem:, stages:, head:")
        return data
    return parse_spec(text)


def is_spec(name: str) -> bool:
    return isinstance(name, str) and (name.startswith("spec:") or name.endswith((".yaml", ".yml")))


def _check_stage(i: int, st: dict) -> dict:
    if not isinstance(st, dict):
        raise SpecError(f"stage {i}: expected a mapping like {{mixer: attention, depth: 2, width: 64}}, got {st!r}")
    mixer = st.get("mixer")
    if mixer not in MIXERS:
        raise SpecError(f"stage {i}: unknown mixer {mixer!r}; mixers: {', '.join(MIXERS)}")
    opts, strided = MIXERS[mixer].options, MIXERS[mixer].strided
    unknown = set(st) - STAGE_KEYS - set(opts)
    if unknown:
        raise SpecError(f"stage {i} ({mixer}): unknown option(s) {sorted(unknown)}; this mixer takes "
                        f"{sorted(set(opts) | STAGE_KEYS - {'mixer'})}")
    for key in ("depth", "width"):
        if not isinstance(st.get(key), int) or st[key] < 1:
            raise SpecError(f"stage {i} ({mixer}): {key} must be a positive integer, got {st.get(key)!r}")
    if st["width"] > MAX_WIDTH:
        raise SpecError(f"stage {i} ({mixer}): width {st['width']} is beyond any trainable model (at most "
                        f"{MAX_WIDTH})")
    _check_options(i, mixer, {**opts, **st})
    down = st.get("downsample", "stride" if strided else "conv")
    allowed = ("stride", "none") if strided else ("conv", "merge", "none")
    if down not in allowed:
        raise SpecError(f"stage {i} ({mixer}): downsample {down!r} is not one of {', '.join(allowed)}"
                        + (" (ResNet blocks downsample inside their first block)" if strided else ""))
    problem = MIXERS[mixer].check(st) if MIXERS[mixer].check is not None else None
    if problem:
        raise SpecError(f"stage {i} ({mixer}): {problem}")
    pos = st.get("pos", "none")
    if pos not in POS:
        raise SpecError(f"stage {i} ({mixer}): pos {pos!r} is not one of {', '.join(POS)}")
    context = st.get("context", "none")
    if context != "none":
        from ..mixers.context import CONTEXT_MODULES
        if context not in CONTEXT_MODULES:
            raise SpecError(f"stage {i} ({mixer}): context {context!r} is not one of none, "
                            f"{', '.join(CONTEXT_MODULES)}")
    placement = st.get("context_placement", "stage")
    if placement not in CONTEXT_PLACEMENTS:
        raise SpecError(f"stage {i} ({mixer}): context_placement {placement!r} is not one of "
                        f"{', '.join(CONTEXT_PLACEMENTS)}")
    if placement == "block" and not strided:
        raise SpecError(f"stage {i} ({mixer}): context_placement=block puts a context module inside every "
                        f"block of a basic or bottleneck stage, not of {mixer}; use context_placement=stage")
    if placement == "block" and context == "none":
        raise SpecError(f"stage {i} ({mixer}): context_placement=block needs a context module: give context=NAME")
    return {**opts, "mlp_ratio": None, **st, "downsample": down, "pos": pos, "context": context,
            "context_placement": placement}


def _check_options(i: int, mixer: str, st: dict) -> None:
    """The options the built-in mixers share: sizes and counts are positive integers, heads divide the width."""
    for key in ("kernel", "window", "pool", "heads"):
        if key in st and (not isinstance(st[key], int) or isinstance(st[key], bool) or st[key] < 1):
            raise SpecError(f"stage {i} ({mixer}): {key} must be a positive integer, got {st[key]!r}")
    if "heads" in st and "key_dim" not in st and st["width"] % st["heads"]:  # key_dim: heads of their own width
        raise SpecError(f"stage {i} ({mixer}): heads={st['heads']} does not divide the width {st['width']}; use a "
                        f"divisor of {st['width']}")
    for key in ("tokens_ratio", "mlp_ratio"):
        v = st.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
            raise SpecError(f"stage {i} ({mixer}): {key} must be a positive number, got {v!r}")


def check_spec(source) -> dict:
    """Load a specification and check it without building anything. Returns it normalised:
    the stem and head with their defaults, each stage with its mixer's default options."""
    spec = load_spec(source)
    unknown = set(spec) - {"stem", "stages", "head", "mlp_ratio", "name"}
    if unknown:
        raise SpecError(f"unknown specification key(s) {sorted(unknown)}; use stem, stages, head, mlp_ratio")
    stages = spec.get("stages") or []
    if not stages:
        raise SpecError("a specification needs at least one stage")
    stem = {"type": "patch", "size": 4, **(spec.get("stem") or {})}
    if stem["type"] not in STEMS:
        raise SpecError(f"stem type {stem['type']!r} is not one of {', '.join(STEMS)}")
    size = stem.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_STEM:
        raise SpecError(f"stem size {size!r} must be an integer from 1 to {MAX_STEM} (the patch side, or the conv "
                        f"stem's stride), e.g. patch4")
    if stem["type"] == "conv" and (size < 2 or size & (size - 1)):
        raise SpecError(f"a conv stem's size (its stride) must be a power of two >= 2, got {size}")
    head = {"pool": "avg", "distilled": False, **(spec.get("head") or {})}
    if set(head) - {"pool", "distilled"} or head["pool"] != "avg" or not isinstance(head["distilled"], bool):
        raise SpecError(f"head {head!r}: a specified model's head is {{pool: avg}}, with distilled: true for DeiT's "
                        f"distillation token")
    stages = [_check_stage(i, st) for i, st in enumerate(stages)]
    if head["distilled"]:
        check_distillable(stages)
    return {**spec, "stem": stem, "head": head, "stages": stages}


def check_distillable(stages: list[dict]) -> None:
    """A distillation token joins the last stage's sequence of grid tokens: that stage must mix by global
    attention (the one mixer that takes a token beside the grid) with no context module after its blocks."""
    last = stages[-1]
    if last["mixer"] != "attention" or last["context"] != "none":
        raise SpecError(f"a distillation token (distilled: true) joins the last stage's tokens, which must be mixed by "
                        f"global attention, but the last stage is {last['mixer']}"
                        + (f" with context={last['context']}" if last["context"] != "none" else "")
                        + "; end the specification with an attention stage, or distil this model through its one "
                          "head (logit distillation: task distill works with any student)")


class SpecNet(HierarchicalModel):
    """A network built from a specification (see the module docstring)."""

    def __init__(self, spec, img_size=224, in_chans: int = 3, num_classes: int = 1000, mlp_ratio: float | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, distilled: bool | None = None):
        spec = check_spec(spec)
        if distilled is not None:  # the argument overrides the specification's head
            spec["head"] = {**spec["head"], "distilled": bool(distilled)}
            if distilled:
                check_distillable(spec["stages"])
        distilled = spec["head"]["distilled"]
        stages_cfg, stem_cfg = spec["stages"], spec["stem"]
        default_ratio = mlp_ratio or spec.get("mlp_ratio", 4.0)
        img = to_2tuple(img_size)
        width0 = stages_cfg[0]["width"]
        reduction = stem_cfg["size"]
        grid = (img[0] // reduction, img[1] // reduction)  # the feature map's size, stage by stage
        if stem_cfg["type"] == "patch":
            stem = PatchEmbed(stem_cfg["size"], in_chans, width0, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        else:  # conv: 3x3 stride-2 convolutions down to the stem's stride
            n = stem_cfg["size"].bit_length() - 1  # a power of two (check_spec)
            stem = ConvStem(in_chans, [max(width0 // 2 ** (n - k), 8) for k in range(n)], width0)

        dpr = stochastic_depth_rates(drop_path_rate, [s["depth"] for s in stages_cfg])
        ln = partial(nn.LayerNorm, eps=1e-6)
        stages, info, mixers, contexts = [], [], [], []
        prev = width0
        for i, st in enumerate(stages_cfg):
            w = st["width"]
            down, stride, block_in = None, 1, w
            if i > 0:
                if st["downsample"] == "none":
                    if w != prev:
                        raise SpecError(f"stage {i}: downsample none keeps the width, but {prev} -> {w}; use "
                                        f"another downsample, or width {prev}")
                elif st["downsample"] == "merge":  # odd sizes are padded: ceil
                    down, grid = PatchMerging(prev, w), ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
                elif st["downsample"] == "stride":  # 3x3, stride 2, padding 1: ceil
                    stride, grid = 2, ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
                else:
                    down, grid = ConvEmbed(prev, w, 2, 2, pre_norm=ln), (grid[0] // 2, grid[1] // 2)
                reduction = reduction * 2 if st["downsample"] != "none" else reduction
            if MIXERS[st["mixer"]].strided:
                block_in = prev if i > 0 else width0
            if st["pos"] != "none":
                pos = _GridAbsPos(grid, w) if st["pos"] == "abs" else ConditionalPosEnc(w, 3)
                down = pos if down is None else nn.Sequential(down, pos)
            ratio = st["mlp_ratio"] or default_ratio
            make = None
            if st["context"] != "none":
                from ..mixers.context import CONTEXT_MODULES

                def make(dim, info_ctx=CONTEXT_MODULES[st["context"]], grid=grid):
                    contexts.append(info_ctx.build(dim, grid))
                    return contexts[-1]
            inside = make if st["context_placement"] == "block" else None
            blocks = [self._block(st, w, grid, ratio, dpr[i][j], j, drop_rate,
                                  block_in if j == 0 else w, stride if j == 0 else 1, inside)
                      for j in range(st["depth"])]
            if make is not None and inside is None:  # a global context module after the stage's blocks
                blocks.append(make(w))
            stages.append(Stage(down, blocks))
            info.append(dict(num_chs=w, reduction=reduction, module=f"stages.{i}"))
            mixers.append(self._describe(st))
            prev = w
        super().__init__(in_chans, num_classes, img_size, stem=stem, stages=stages, norm=ln(prev),
                         head=ClassifierHead(prev, num_classes, pool="avg", num_prefix_tokens=int(distilled),
                                             drop_rate=drop_rate),
                         feature_info=info, stage_mixers=mixers)
        self.spec = {**spec, "mlp_ratio": default_ratio}
        # DeiT's distillation token: a learned token that joins the last stage's grid tokens; its own head
        # classifies it, the class head the average of the grid tokens (see forward_heads)
        self.distilled, self.distilled_training = distilled, False
        self.num_prefix_tokens = int(distilled)
        self.dist_token = nn.Parameter(torch.zeros(1, 1, prev)) if distilled else None
        self.head_dist = (nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()) if distilled else None
        kept = [copy.deepcopy(c.state_dict()) for c in contexts]  # context modules keep their own init
        self.apply(init_weights_vit)
        for c, state in zip(contexts, kept):
            c.load_state_dict(state)
        if distilled:
            nn.init.trunc_normal_(self.dist_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | ({"dist_token"} if self.distilled else set())

    def token_encoder(self) -> TokenEncoder:
        """One stage of global attention on a patch stem with an absolute position table: MAE's encoder."""
        stages, stem = self.spec["stages"], self.spec["stem"]
        st = stages[0]
        why = None
        if len(stages) != 1:
            why = f"it has {len(stages)} stages (MAE needs one isotropic stage)"
        elif stem["type"] != "patch":
            why = f"its stem is {stem['type']} (MAE needs a patch stem: 'patchP')"
        elif st["mixer"] != "attention":
            why = f"its stage mixes by {st['mixer']} (MAE drops tokens, which needs global attention)"
        elif st["context"] != "none":
            why = f"its stage has context={st['context']}"
        elif st["pos"] != "abs":
            why = f"its position encoding is pos={st['pos']} (MAE needs an absolute table: pos=abs)"
        elif self.distilled:
            why = "it has a distillation token (pretrain the model without it)"
        if why:
            raise ValueError(f"MAE cannot pretrain this specification: {why}; MAE's encoder sees only the visible "
                             f"tokens, so it needs 'patchP / attention:DxW:pos=abs' (or a ViT); pretrain this model "
                             f"with mim.method=simmim")
        stage = self.stages[0]
        return TokenEncoder(self.stem, stage.downsample.pos, [], stage.blocks, self.norm, stem["size"])

    def _last_stage_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The last stage of a distilled model: its downsampling on the (B, H, W, C) map, then its blocks on the
        sequence (distillation token, H*W grid tokens); returns the sequence and (H, W)."""
        last = self.stages[-1]
        x = last.downsample(x)
        B, H, W, C = x.shape
        x = torch.cat([self.dist_token.expand(B, -1, -1), x.reshape(B, H * W, C)], dim=1)
        return last.blocks(x), (H, W)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """A (B, H, W, C) map; for a distilled model the (B, 1 + H*W, C) sequence, distillation token first."""
        if not self.distilled:
            return super().forward_features(x)
        x = self._embed(x)
        for stage in self.stages[:-1]:
            x = stage(x)
        return self.norm(self._last_stage_tokens(x)[0])

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A distilled model's (class logits, distillation logits) from :meth:`forward_features`' sequence."""
        return self.head(x), self.head_dist(x[:, 0])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if not self.distilled:
            return self.head(x, pre_logits=pre_logits)
        if pre_logits:
            return (self.head(x, pre_logits=True) + x[:, 0]) / 2
        logits, logits_dist = self.forward_heads(x)
        if self.distilled_training and self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2  # DeiT's inference: the average of the two heads

    def reset_classifier(self, num_classes: int, pool: str | None = None) -> None:
        super().reset_classifier(num_classes, pool)
        if self.distilled:
            device = self.dist_token.device
            self.head_dist = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else (
                nn.Identity())

    def forward_intermediates(self, x: torch.Tensor, indices=None) -> list[torch.Tensor]:
        if not self.distilled:
            return super().forward_intermediates(x, indices)
        idx = self._normalize_indices(indices)
        x = self._embed(x)
        maps, last = {}, len(self.stages) - 1
        for i, stage in enumerate(self.stages[: max(idx) + 1]):
            if i < last:
                x = stage(x)
                if i in idx:
                    maps[i] = x.permute(0, 3, 1, 2)
            else:  # the grid tokens of the last stage, without the distillation token
                seq, (H, W) = self._last_stage_tokens(x)
                maps[i] = self.norm(seq)[:, 1:].reshape(seq.shape[0], H, W, -1).permute(0, 3, 1, 2)
        return [maps[i] for i in idx]

    @staticmethod
    def _describe(st: dict) -> str:
        desc = MIXERS[st["mixer"]].description
        extra = {k: st[k] for k in MIXERS[st["mixer"]].options}
        if st["pos"] != "none":
            extra["pos"] = st["pos"]
        if st["context"] != "none":
            extra["context"] = st["context"] + (" in every block" if st["context_placement"] == "block" else "")
        return f"{desc} ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else desc

    @staticmethod
    def _block(st: dict, w: int, grid, ratio: float, dp: float, j: int, drop: float, in_chs: int,
               stride: int, context=None) -> nn.Module:
        mixer = MIXERS[st["mixer"]]
        if mixer.strided:
            return mixer.block(st, w, grid, ratio, dp, j, drop, in_chs=in_chs, stride=stride, context=context)
        return mixer.block(st, w, grid, ratio, dp, j, drop)


class _GridAbsPos(nn.Module):
    """A learned absolute position embedding added to a (B, H, W, C) map."""

    def __init__(self, grid, dim: int):
        super().__init__()
        self.pos = AbsolutePosEmbed(grid, dim)

    def forward(self, x):
        B, H, W, C = x.shape
        return self.pos(x.reshape(B, H * W, C), (H, W)).reshape(B, H, W, C)


def create_from_spec(source, **kwargs) -> SpecNet:
    """Build a :class:`SpecNet`; keyword arguments as for ``create_model``."""
    from .base import build
    spec = load_spec(source)
    model = build(SpecNet, {"spec": spec}, kwargs)
    name = spec.get("name") or (str(source) if not isinstance(source, dict) else "spec")
    model.pretrained_cfg = dict(model.pretrained_cfg, architecture=name)
    return model


# -- the built-in mixers -------------------------------------------------------------------------------------
# All ten register here, in the order `mixlab list --mixers` shows them: they are the spec language's base
# vocabulary (the table above); the blocks of ConvNeXt and ResNet come from their model files.
def _ln(dim: int) -> nn.Module:
    return nn.LayerNorm(dim, eps=1e-6)


def _generic(mixer: nn.Module, w: int, ratio: float, dp: float, drop: float) -> nn.Module:
    return MetaBlock(w, mixer, mlp_ratio=ratio, norm_layer=_ln, drop=drop, drop_path=dp)


def _attention(st, w, grid, ratio, dp, j, drop):
    return _generic(Attention(w, st["heads"], proj_drop=drop), w, ratio, dp, drop)


def _window(st, w, grid, ratio, dp, j, drop):
    win = st["window"]
    return _generic(WindowAttention(w, st["heads"], win, 0 if j % 2 == 0 else win // 2, proj_drop=drop),
                    w, ratio, dp, drop)


def _dwconv(st, w, grid, ratio, dp, j, drop):
    return _generic(DepthwiseConv(w, st["kernel"]), w, ratio, dp, drop)


def _convnext(st, w, grid, ratio, dp, j, drop):
    return ConvNeXtBlock(w, st["kernel"], mlp_ratio=ratio, layer_scale=None, drop_path=dp)


def _pool(st, w, grid, ratio, dp, j, drop):
    return MetaBlock(w, Pooling(st["pool"]), mlp_ratio=ratio, norm_layer=GroupNorm1NHWC, drop=drop, drop_path=dp,
                     layer_scale=1e-5)


def _mlp(st, w, grid, ratio, dp, j, drop):
    mixer = TokenMixingMLP(grid[0] * grid[1], max(1, int(st["tokens_ratio"] * w)), grid, drop=drop)
    return MetaBlock(w, mixer, mlp=Mlp(w, int(ratio * w), drop=drop), norm_layer=_ln, drop_path=dp)


def _container(st, w, grid, ratio, dp, j, drop, dynamic=True):
    mixer = ContainerMixer(w, st.get("heads", 1), dynamic=dynamic, static="conv", kernel_size=st["kernel"],
                           proj_drop=drop)
    return MetaBlock(w, mixer, mlp_ratio=ratio, norm_layer=BatchNormNHWC, drop=drop, drop_path=dp,
                     pos=ConditionalPosEnc(w, 3))


def _resnet(kind, st, w, grid, ratio, dp, j, drop, *, in_chs, stride, context):
    block = (BasicBlock(in_chs, w, stride, dp, context) if kind is BasicBlock
             else Bottleneck(in_chs, w // Bottleneck.expansion, stride, dp, context))
    own = {id(mod) for mod in block.context.modules()} if block.context is not None else set()
    for mod in block.modules():
        if isinstance(mod, nn.Conv2d) and id(mod) not in own:  # a context module keeps its init
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
    return block


def _bottleneck_width(st: dict) -> str | None:
    if st["width"] % Bottleneck.expansion:
        return f"width {st['width']} must be divisible by 4 (the block is width/4 wide inside)"
    return None


register_spec_mixer("attention", {"heads": 4}, "attention (global)", _attention)
register_spec_mixer("window", {"heads": 4, "window": 7}, "window attention (shifted)", _window)
register_spec_mixer("dwconv", {"kernel": 7}, "depthwise conv", _dwconv)
register_spec_mixer("convnext", {"kernel": 7}, "ConvNeXt block (depthwise conv)", _convnext)
register_spec_mixer("pool", {"pool": 3}, "pooling", _pool)
register_spec_mixer("mlp", {"tokens_ratio": 0.5}, "token-mixing MLP", _mlp)
register_spec_mixer("container", {"heads": 4, "kernel": 5}, "container: α·attention + β·dwconv", _container)
register_spec_mixer("conv_static", {"kernel": 5}, "container static: dwconv", partial(_container, dynamic=False))
register_spec_mixer("basic", {}, "ResNet basic block (dense 3x3 convs)", partial(_resnet, BasicBlock), strided=True)
register_spec_mixer("bottleneck", {}, "ResNet bottleneck (dense 3x3 conv)", partial(_resnet, Bottleneck),
                    strided=True, check=_bottleneck_width)
