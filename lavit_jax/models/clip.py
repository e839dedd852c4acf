"""OpenAI CLIP (transformers' ``CLIPModel``) in Flax Linen, NHWC.

Vision tower: pixels [B, H, W, C] (CLIP-normalised) -> patch conv -> [CLS] + patches + position
embedding -> pre-LN -> encoder -> post-LN of the CLS token -> ``visual_projection`` [B, P].
Text tower: input_ids [B, T] -> token + position embedding -> causal encoder -> final LN -> the state
at the eos token (``argmax(input_ids)`` when ``eos_token_id == 2``, the legacy configs, else the first
``eos_token_id``, as transformers does) -> ``text_projection`` [B, P].

Sizes come from ``clip_config_from_hf(dict)``, which reads the fields of a transformers ``CLIPConfig``
dict (``config.json`` of a CLIP model or of the Stable Diffusion safety checker). Module names follow the
transformers keys (``embeddings.`` and ``encoder.`` dropped); the encoder layers are one ``layers`` subtree
stacked on a leading [depth] axis (``scan_layers=True``) or ``layers_0 .. layers_{depth-1}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from lavit_jax.ops.attention import dot_product_attention
from lavit_jax.ops.layers import LayerNorm, dense, merge_heads, split_heads
from lavit_jax.ops.scan import apply_layers

Dtype = jnp.dtype

# transformers' ACT2FN names -> functions (the ones CLIP checkpoints use).
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# Defaults of transformers' CLIPVisionConfig / CLIPTextConfig / CLIPConfig (fields a config.json may omit).
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5, eos_token_id=49407)
_TOP_DEFAULTS = dict(projection_dim=512, logit_scale_init_value=2.6592)
_FLOAT_FIELDS = ("layer_norm_eps",)
_STR_FIELDS = ("hidden_act",)


def _tower_config(d: dict, name: str, defaults: dict) -> dict:
    """One tower's fields: ``<name>_config`` over the defaults, or (as transformers does) ``<name>_config_dict``
    over the defaults when that legacy field is present."""
    legacy = d.get(f"{name}_config_dict")
    sub = legacy if legacy is not None else (d.get(f"{name}_config") or {})
    if not isinstance(sub, dict):
        raise ValueError(f"CLIP config field {name}_config: expected a dict, got {type(sub).__name__}")
    out = {}
    for field, default in defaults.items():
        value = sub.get(field, default)
        where = f"CLIP config field {name}_config.{field}={value!r}"
        if field in _STR_FIELDS:
            if value not in ACTIVATIONS:
                raise ValueError(f"{where} is not supported ({', '.join(ACTIVATIONS)})")
        elif field in _FLOAT_FIELDS:
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{where}: expected a positive number")
            value = float(value)
        else:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{where}: expected a non-negative integer")
        out[field] = value
    if out["hidden_size"] % out["num_attention_heads"]:
        raise ValueError(f"CLIP config {name}_config: hidden_size {out['hidden_size']} is not a multiple of "
                         f"num_attention_heads {out['num_attention_heads']}")
    return out


def clip_config_from_hf(hf_config: dict) -> ml_collections.FrozenConfigDict:
    """A transformers ``CLIPConfig`` dict -> frozen config {projection_dim, logit_scale_init_value, vision, text}.

    Missing fields take transformers' defaults; unsupported values raise ValueError naming the field.
    """
    if not isinstance(hf_config, dict):
        raise ValueError(f"CLIP config: expected a dict, got {type(hf_config).__name__}")
    d = dict(hf_config)
    vision = _tower_config(d, "vision", _VISION_DEFAULTS)
    text = _tower_config(d, "text", _TEXT_DEFAULTS)
    if vision["patch_size"] == 0 or vision["image_size"] < vision["patch_size"]:
        raise ValueError(f"CLIP config field vision_config.patch_size={vision['patch_size']} does not fit "
                         f"image_size={vision['image_size']}")
    top = {}
    for field, default in _TOP_DEFAULTS.items():
        value = d.get(field, default)
        if value is None:
            value = default
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"CLIP config field {field}={value!r}: expected a number")
        top[field] = value
    if not isinstance(top["projection_dim"], int) or top["projection_dim"] <= 0:
        raise ValueError(f"CLIP config field projection_dim={top['projection_dim']!r}: expected a positive integer")
    return ml_collections.FrozenConfigDict(dict(
        projection_dim=int(top["projection_dim"]),
        logit_scale_init_value=float(top["logit_scale_init_value"]),
        vision=vision,
        text=text,
    ))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2. x [B, T, C] -> [B, T, C]."""

    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(self.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(x)
        h = ACTIVATIONS[self.hidden_act](h)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(h)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (with biases). x [B, T, C] -> [B, T, C].

    mask: boolean [B, 1, 1, T] or broadcastable (True = attend); ``is_causal`` adds the causal mask.
    """

    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, x, mask=None, is_causal: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = self.hidden_size
        q, k, v = (split_heads(dense(c, ("embed", "heads"), name=f"{n}_proj", **kw)(x), self.num_heads)
                   for n in ("q", "k", "v"))
        out = dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=self.attention_impl)
        return dense(c, ("heads", "embed"), name="out_proj", **kw)(merge_heads(out))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x += attn(ln1(x)); x += mlp(ln2(x)). x [B, T, C], mask -> ([B, T, C], None)."""

    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    eps: float
    is_causal: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"

    @nn.compact
    def __call__(self, x, mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(self.eps, name="layer_norm1", **kw)(x)
        x = x + CLIPAttention(self.hidden_size, self.num_heads, attention_impl=self.attention_impl,
                              name="self_attn", **kw)(h, mask, self.is_causal)
        h = LayerNorm(self.eps, name="layer_norm2", **kw)(x)
        x = x + CLIPMLP(self.intermediate_size, self.hidden_act, name="mlp", **kw)(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


def _encoder(tower: nn.Module, x, mask=None, is_causal=False):
    """The tower's ``num_hidden_layers`` encoder layers: scanned (params ``layers/...`` stacked on a leading
    [depth] axis) or unrolled (``layers_0 ..``), as ``tower.scan_layers`` says."""
    cfg = tower.config
    block_args = (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act,
                  cfg.layer_norm_eps, is_causal, tower.dtype, tower.param_dtype, tower.attention_impl)
    x, _ = apply_layers(CLIPEncoderLayer, cfg.num_hidden_layers, "layers", x, mask, scan=tower.scan_layers,
                        remat=tower.remat, in_axes=(nn.broadcast,), block_args=block_args)
    return x


class CLIPVisionTransformer(nn.Module):
    """Vision tower. pixels [B, H, W, C] (H = W = image_size) -> (last_hidden_state [B, 1+N, D], pooled [B, D]).

    pooled is ``post_layernorm`` of the CLS state (transformers' ``pooler_output``).
    """

    config: ml_collections.FrozenConfigDict  # the ``vision`` part of ``clip_config_from_hf``
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"
    scan_layers: bool = True
    remat: str = "none"

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, ch = pixels.shape
        if h != cfg.image_size or w != cfg.image_size or ch != cfg.num_channels:
            raise ValueError(f"CLIP vision input {pixels.shape}: expected [B, {cfg.image_size}, {cfg.image_size}, "
                             f"{cfg.num_channels}] (NHWC)")
        p, c = cfg.patch_size, cfg.hidden_size
        x = nn.Conv(
            c, (p, p), strides=(p, p), padding="VALID", use_bias=False, name="patch_embedding",
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                     ("conv_h", "conv_w", "conv_in", "embed")), **kw,
        )(pixels.astype(self.dtype))
        x = x.reshape(b, -1, c)
        n = x.shape[1]
        init = nn.initializers.normal(0.02)
        cls = self.param("class_embedding", nn.with_logical_partitioning(init, ("embed",)), (c,), self.param_dtype)
        pos = self.param("position_embedding", nn.with_logical_partitioning(init, ("pos", "embed")), (n + 1, c),
                         self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c)), x], axis=1)
        x = x + pos.astype(x.dtype)[None]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = LayerNorm(cfg.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        x = _encoder(self, x)
        pooled = LayerNorm(cfg.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
        return x, pooled


class CLIPTextTransformer(nn.Module):
    """Text tower. input_ids [B, T] int, attention_mask [B, T] (1 = token) or None ->
    (last_hidden_state [B, T, D] after ``final_layer_norm``, pooled [B, D] at the eos token)."""

    config: ml_collections.FrozenConfigDict  # the ``text`` part of ``clip_config_from_hf``
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"
    scan_layers: bool = True
    remat: str = "none"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(f"CLIP text input of length {t} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        c = cfg.hidden_size
        init = nn.initializers.normal(0.02)
        tok = nn.Embed(cfg.vocab_size, c, name="token_embedding", embedding_init=nn.with_logical_partitioning(
            init, ("vocab", "embed")), **kw)
        pos = self.param("position_embedding", nn.with_logical_partitioning(init, ("pos", "embed")),
                         (cfg.max_position_embeddings, c), self.param_dtype)
        x = tok(input_ids) + pos[:t].astype(self.dtype)[None]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        mask = None
        if attention_mask is not None:
            mask = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
        x = _encoder(self, x, mask, is_causal=True)
        x = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)
        ids = input_ids.astype(jnp.int32)
        eos_pos = jnp.argmax(ids if cfg.eos_token_id == 2 else (ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(x, eos_pos[:, None, None], axis=1)[:, 0]
        return x, pooled


def _l2_normalize(x):
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


class CLIPModel(nn.Module):
    """CLIP: ``get_image_features`` pixels [B, H, W, C] -> [B, P]; ``get_text_features`` input_ids [B, T] -> [B, P];
    ``__call__`` -> dict(logits_per_image [B_img, B_txt], logits_per_text, image_embeds, text_embeds), the embeds
    L2-normalised and the logits scaled by ``exp(logit_scale)`` (in float32)."""

    config: ml_collections.FrozenConfigDict  # ``clip_config_from_hf``
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = "auto"
    scan_layers: bool = True
    remat: str = "none"

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                  scan_layers=self.scan_layers, remat=self.remat)
        self.vision_model = CLIPVisionTransformer(cfg.vision, **kw)
        self.text_model = CLIPTextTransformer(cfg.text, **kw)
        pkw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        self.visual_projection = dense(cfg.projection_dim, ("embed", "out"), **pkw)
        self.text_projection = dense(cfg.projection_dim, ("embed", "out"), **pkw)
        self.logit_scale = self.param(
            "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(cfg.logit_scale_init_value), ()),
            (), self.param_dtype)

    def get_image_features(self, pixels):
        return self.visual_projection(self.vision_model(pixels)[1])

    def get_text_features(self, input_ids, attention_mask=None):
        return self.text_projection(self.text_model(input_ids, attention_mask)[1])

    def __call__(self, pixels, input_ids, attention_mask=None):
        image_embeds = _l2_normalize(self.get_image_features(pixels))
        text_embeds = _l2_normalize(self.get_text_features(input_ids, attention_mask))
        logits_per_text = (text_embeds @ image_embeds.T) * jnp.exp(self.logit_scale.astype(jnp.float32))
        return dict(logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
                    image_embeds=image_embeds, text_embeds=text_embeds)


def dummy_inputs(config, batch: int = 1):
    """Zero (pixels, input_ids) of the right shapes for ``CLIPModel.init``."""
    v = config.vision
    pixels = jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32)
    return pixels, jnp.zeros((batch, 1), jnp.int32)
