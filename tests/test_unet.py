"""UNet2DConditionModel against diffusers (SD-1.5-style and SDXL-style tiny configs), sharding, loading."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import linen as nn

from lavit_jax.convert import diffusers as CD
from lavit_jax.convert.torch_io import WeightMismatchError, param_shapes
from lavit_jax.models import unet as U
from lavit_jax.ops import sharding

# SD-1.5 shape in miniature: cross-attention everywhere but the last block, heads given as an int,
# conv projections, 48-d condition (the fixture token decoder's low-res width).
SD15_TINY = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48, attention_head_dim=4, norm_num_groups=8,
)
# SDXL shape in miniature: no attention in the first block, per-block heads, 2 transformer layers in
# the second block (and the mid block), linear projections, text_time addition embedding.
SDXL_TINY = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=128, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), norm_num_groups=8,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80 + 6 * 8,
)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def torch_unet(config, seed=0):
    torch.manual_seed(seed)
    m = TorchUNet(**config).eval()
    with torch.no_grad():  # move norms / zero-initialised layers off their defaults
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def flax_from_torch(tm):
    cfg = U.unet_config(dict(tm.config))
    model = U.UNet2DConditionModel(cfg)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    return model, CD.params_from_state_dict(model, U.example_inputs(cfg), sd, source="test")


def inputs(config, batch=2, hw=16, ctx_len=7, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, hw, hw)).astype(np.float32)
    ctx = rng.standard_normal((batch, ctx_len, config["cross_attention_dim"])).astype(np.float32)
    mask = np.ones((batch, ctx_len), bool)
    mask[0, 3:] = False  # the first row attends to 3 of 7 positions
    t = np.array([981.0, 20.0, 500.0, 1.0][:batch], np.float32)
    extra = {}
    if config.get("addition_embed_type") == "text_time":
        extra["text_embeds"] = rng.standard_normal((batch, 80)).astype(np.float32)
        extra["time_ids"] = np.tile(np.array([[1024, 768, 0, 0, 1024, 1024]], np.float32), (batch, 1))
    return x, t, ctx, mask, extra


def build_variant(name):
    config = {"sd15": SD15_TINY, "sdxl": SDXL_TINY}[name]
    tm = torch_unet(config)
    model, params = flax_from_torch(tm)
    fn = jax.jit(lambda p, x, t, c, m, te, ti: model.apply({"params": p}, x, t, c, m, te, ti))
    return name, config, tm, model, params, fn


@pytest.fixture(scope="module")
def sd15_variant():
    return build_variant("sd15")


@pytest.fixture(scope="module")
def sdxl_variant():
    return build_variant("sdxl")


@pytest.mark.parity
@pytest.mark.parametrize("variant_name", ["sd15_variant", "sdxl_variant"])
def test_unet_matches_diffusers(variant_name, request):
    name, config, tm, model, params, fn = request.getfixturevalue(variant_name)
    x, t, ctx, mask, extra = inputs(config)
    kw = {}
    if extra:
        kw["added_cond_kwargs"] = {k: torch.tensor(v) for k, v in extra.items()}
    with torch.no_grad():
        ref = tm(torch.tensor(x), torch.tensor(t), encoder_hidden_states=torch.tensor(ctx),
                 encoder_attention_mask=torch.tensor(mask), **kw).sample.numpy()
        ref_nomask = tm(torch.tensor(x), torch.tensor(t), encoder_hidden_states=torch.tensor(ctx), **kw).sample.numpy()
    x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    out = fn(params, x_nhwc, t, ctx, mask, extra.get("text_embeds"), extra.get("time_ids"))
    out = np.asarray(out).transpose(0, 3, 1, 2)
    assert rel_err(out, ref) < 1e-4, name
    # The mask matters: the masked row differs from the unmasked reference, the unmasked row does not.
    assert rel_err(ref[0], ref_nomask[0]) > 1e-3
    assert rel_err(out[1], ref_nomask[1]) < 1e-4


@pytest.mark.sharding
def test_sharded_unet_equals_single_device(sdxl_variant):
    """The SDXL-style UNet (text_time, linear projections, 2-layer transformers) on a (2, 2, 2) mesh."""
    name, config, tm, model, params, fn = sdxl_variant
    x, t, ctx, mask, extra = inputs(config, batch=4)
    args = (jnp.asarray(x.transpose(0, 2, 3, 1)), t, ctx, mask, extra.get("text_embeds"), extra.get("time_ids"))
    single = np.asarray(fn(params, *args))

    mesh = sharding.make_mesh((2, 2, 2))
    rules = sharding.DEFAULT_RULES
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *U.example_inputs(model.config)))["params"]
    p_shard = sharding.logical_sharding(boxed, mesh, rules)
    sharded_params = jax.device_put(params, p_shard)
    arg_shard = tuple(None if a is None else sharding.batch_sharding(mesh, np.ndim(a)) for a in args)
    sharded_args = tuple(None if a is None else jax.device_put(a, s) for a, s in zip(args, arg_shard))

    def apply(p, *a):
        with nn.logical_axis_rules(rules):
            return model.apply({"params": p}, *a)

    with jax.set_mesh(mesh):
        out = jax.jit(apply)(sharded_params, *sharded_args)
    assert len(out.sharding.device_set) == 8
    # the params really are split (a conv kernel over 'tensor', a dense kernel over 'fsdp')
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(jax.tree.map(lambda a: a.sharding, sharded_params)))
    np.testing.assert_allclose(np.asarray(out), single, rtol=1e-5, atol=1e-5 * np.abs(single).max())


def test_load_unet_folder_and_mismatch_report(tmp_path):
    tm = torch_unet(SD15_TINY, seed=1)
    tm.save_pretrained(tmp_path / "unet", safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file()
    model, params = CD.load_unet(tmp_path / "unet")
    _, ref_params = flax_from_torch(tm)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert model.config.cross_attention_dim == (48, 48)

    # A config that disagrees with the weights: one error listing the mis-shaped keys.
    cfg = json.loads((tmp_path / "unet" / "config.json").read_text())
    cfg["cross_attention_dim"] = 40
    (tmp_path / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightMismatchError, match=r"mis-shaped .*attn2\.to_k\.weight"):
        CD.load_unet(tmp_path / "unet")


SD15_RELEASED = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32, downsample_padding=1,
)
SDXL_RELEASED = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


@pytest.mark.parametrize("config", [SD15_RELEASED, SDXL_RELEASED], ids=["sd15", "sdxl"])
def test_released_shapes_map_one_to_one(config):
    """Every tensor of the full-size diffusers UNets (built on the meta device) has its Flax param."""
    with torch.device("meta"):
        tm = TorchUNet(**config)
    cfg = U.unet_config(dict(tm.config))
    model = U.UNet2DConditionModel(cfg)
    shapes = param_shapes(jax.eval_shape(lambda: model.init(jax.random.key(0), *U.example_inputs(cfg))))
    shapes = {k[1:]: v for k, v in shapes.items()}  # drop the "params" collection
    rule = CD.diffusers_rule(shapes)
    seen = set()
    for key, t in tm.state_dict().items():
        path, _ = rule(key)
        shape = tuple(t.shape)
        flax_shape = {4: shape[2:] + shape[1::-1], 2: shape[::-1]}.get(len(shape), shape)
        assert shapes.get(path) == flax_shape, (key, path, shape)
        seen.add(path)
    assert seen == set(shapes)
    assert sum(int(np.prod(s)) for s in shapes.values()) == sum(p.numel() for p in tm.parameters())


def test_unet_config_shapes_and_errors():
    sdxl = U.unet_config(SDXL_TINY)
    assert sdxl.num_heads == (2, 4) and sdxl.transformer_layers_per_block == ((1,), (2,))
    assert sdxl.reverse_transformer_layers_per_block == ((2, 2), (1, 1))
    with pytest.raises(ValueError, match="class_embed_type"):
        U.unet_config({**SD15_TINY, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="down_block_types"):
        U.unet_config({**SD15_TINY, "down_block_types": ("SimpleCrossAttnDownBlock2D", "DownBlock2D")})
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        U.unet_config({**SDXL_TINY, "projection_class_embeddings_input_dim": None})
