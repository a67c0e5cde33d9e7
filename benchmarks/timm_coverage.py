#!/usr/bin/env python
"""How much of timm's models (PyTorch Image Models) fxprune can compact exactly.

The same check as ``torchvision_coverage.py`` (whose runner this script uses), over timm's models at a
pinned version: one model of every timm model module (the one with the fewest parameters, not a
``test_`` model), a few more of the families most used (resnet, resnext, efficientnet, mobilenetv3,
convnext, cspresnet, mixer, dla, regnet, ghostnet), and timm's tiny ``test_`` models. Each is built
with ``pretrained=False`` (nothing is downloaded), in eval mode, with constant parameters and BatchNorm
statistics redrawn by ``fxprune.zoo.randomize_constants``. The input is 1x3x64x64 where the model
runs on it, else its default input size (``pretrained_cfg["input_size"]``, e.g. 224 for a ViT).

A model passes when ``compact`` equals ``apply_masks`` under random masks over every prunable group
(and with every other removable layer removed), so every group it does not prune is refused by
``analyze`` with a reason. A model FX cannot trace fails ``analyze`` with a ``TraceError`` naming the
module and the construct; it counts as untraceable.

Usage::

    python benchmarks/timm_coverage.py                          # writes "## timm coverage" in docs/benchmarks.md
    python benchmarks/timm_coverage.py --models resnet18,vit_tiny_patch16_224 --no-doc
"""
from __future__ import annotations

import sys
from pathlib import Path

import torchvision_coverage as coverage

SECTION = "## timm coverage"
SMALL = 64
# The smallest model of each timm model module (timm 1.0.31), then more of the common families.
SMALLEST = (
    "beit_base_patch16_224", "halonet_h1", "mobileone_s1", "cait_xxs24_224", "coat_tiny", "convit_tiny",
    "convmixer_768_32", "convnext_zepto_rms", "cpubone_nano", "crossvit_tiny_240", "csatv2",
    "cs3darknet_focus_s", "cspnext_tiny", "davit_tiny", "deit_tiny_patch16_224", "densenet121", "dla46x_c",
    "dpn48b", "edgenext_xx_small", "efficientformer_l1", "efficientformerv2_s0", "mobilenetv2_035",
    "efficientvim_m1", "efficientvit_b0", "efficientvit_m0", "vit_tiny_patch16_dinov3_qkvb", "fasternet_t0",
    "fastvit_t8", "focalnet_tiny_srf", "gcvit_xxtiny", "ghostnet_050", "hardcorenas_b", "hgnetv2_b0",
    "hiera_tiny_224", "sam2_hiera_tiny", "hrnet_w18_small", "iformer_t", "inception_next_atto",
    "inception_resnet_v2", "inception_v3", "inception_v4", "lcnetv2_small", "levit_128s", "lowformer_b0",
    "mambaout_femto", "maxvit_pico_rw_256", "poolformerv2_s12", "gmlp_ti16_224", "mobilenetv3_small_050",
    "mobilenetv5_base", "mobilevit_xxs", "mvitv2_tiny", "naflexvit_base_patch16_parfac_gap", "nasnetalarge",
    "nest_tiny", "nextvit_small", "nf_regnet_b0", "pit_ti_224", "pnasnet5large", "pvt_v2_b0", "qwen3_vit_88m",
    "rdnet_tiny", "regnetx_002", "repghostnet_050", "repvit_m1", "res2next50", "resnest14d", "resnet10t",
    "resnetv2_18", "rexnet_100", "selecsls42", "legacy_seresnet18", "sequencer2d_s", "shvit_s1", "skresnet18",
    "starnet_s050", "swiftformer_xs", "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256",
    "swinv2_cr_tiny_224", "tiny_vit_5m_224", "tnt_s_legacy_patch16_224", "tresnet_m", "twins_svt_small",
    "vgg11", "visformer_tiny", "vit_tiny_patch16_224", "vit_tiny_r_s16_p8_224", "vit_srelpos_small_patch16_224",
    "samvit_base_patch16_224", "vitamin_small_224", "volo_d1_224", "ese_vovnet19b_slim_dw", "legacy_xception",
    "xception41p", "xcit_nano_12_p8_224", "deepseek_vit_412m", "gemma4_vit_167m",
)
COMMON = (
    "resnet18", "resnet50d", "resnext50_32x4d", "seresnext26d_32x4d", "efficientnet_b0", "tf_efficientnetv2_b0",
    "mobilenetv3_large_100", "convnext_atto", "cspresnet50", "cspdarknet53", "mixer_s16_224", "dla34",
    "regnety_002", "ghostnetv2_100", "res2net50_26w_4s", "mnasnet_100", "vit_small_patch16_224",
)
TESTS = (
    "test_byobnet", "test_convnext", "test_convnext2", "test_convnext3", "test_efficientnet",
    "test_efficientnet_gn", "test_efficientnet_ln", "test_efficientnet_evos", "test_mambaout", "test_coatnet",
    "test_maxvit", "test_nfnet", "test_resnet", "test_vit", "test_vit2", "test_vit3", "test_vit4",
    "test_vit_relpos",
)
HUGE = 150e6  # deepseek_vit_412m and gemma4_vit_167m are listed, and skipped by default


def names() -> list[str]:
    return list(dict.fromkeys(SMALLEST + COMMON + TESTS))


def exists(name: str) -> bool:
    from fxprune.zoo import timm_models

    return name in timm_models().list_models()


def default_size(name: str) -> tuple[int, ...]:
    from fxprune.zoo import timm_models

    return tuple(timm_models().models.get_pretrained_cfg(name).input_size[1:])


def create(name: str):
    import warnings

    from fxprune.zoo import timm_models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm_models().create_model(name, pretrained=False)


def runs_on(model, x) -> bool:
    import torch

    try:
        with torch.no_grad():
            model(x)
        return True
    except Exception:  # noqa: BLE001 - too small for this model: its default size is used
        return False


def build(name: str, seed: int):
    import torch

    from fxprune.zoo import randomize_constants

    torch.manual_seed(seed)
    model = randomize_constants(create(name), seed).eval()
    x = torch.randn(1, 3, SMALL, SMALL)
    if not runs_on(model, x):
        x = torch.randn(1, 3, *default_size(name))
    return model, x


def param_count(name: str) -> int:
    return sum(p.numel() for p in create(name).parameters())


TIMM = coverage.Zoo(
    name="timm", section=SECTION, script=Path(__file__).resolve(), names=names, build=build,
    input_size=lambda name: "x".join(map(str, default_size(name))), param_count=param_count, package="timm",
    huge_params=HUGE, exists=exists,
    models_text="One model of every timm model module (the one with the fewest parameters), more of the common "
                "families and timm's tiny `test_` models, built with `pretrained=False` (nothing downloaded), eval "
                "mode, constant parameters and BatchNorm statistics redrawn by `fxprune.zoo.randomize_constants`; "
                "input 1x3x64x64 where the model runs on it, else its default input size. A model whose `analyze` "
                "raises TraceError is untraceable (its message names the module and the construct).")


if __name__ == "__main__":
    sys.exit(coverage.main(zoo=TIMM))
