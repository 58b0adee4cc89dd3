import functools

import pytest
import timm
import torch

import snp_fx
from models import randomize_constants

torch.set_num_threads(2)

TIMM_MODELS = [
    "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
    "deit_tiny_distilled_patch16_224", "vit_tiny_patch16_224", "vit_small_patch16_224",
    "vit_base_patch16_224", "deit3_small_patch16_224", "beit_base_patch16_224",
    "swin_tiny_patch4_window7_224", "pvt_v2_b0", "efficientformer_l1",
]


@functools.lru_cache(maxsize=None)
def timm_model(name: str):
    torch.manual_seed(0)
    return randomize_constants(timm.create_model(name, pretrained=False).eval())


@functools.lru_cache(maxsize=None)
def timm_analysis(name: str):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 224, 224)
    return snp_fx.analyze(timm_model(name), x)


@pytest.fixture(params=TIMM_MODELS)
def timm_name(request):
    return request.param
