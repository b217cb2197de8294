"""TransNormerLLM (OpenNLPLab/TransNormerLLM-385M, -1B, -7B) as chattune's own transformers model.

What: `TransnormerConfig`, `TransnormerModel` and `TransnormerForCausalLM`, registered with transformers' Auto classes
under the model type "chattune_transnormer" (not the published "transnormer": that type string belongs to the
publisher's remote code). The config takes the published config.json fields under their published names
(`config_from_published` maps such a dict), and the model loads the published checkpoint's weights as they are, under
the same names:

- `model.embed_tokens.weight` [vocab, decoder_embed_dim], `lm_head.weight` (tied to the embedding, see below);
- `model.layers.N.token_mixer.qkvu_proj.weight` [4 * hidden_dim, decoder_embed_dim] (rows: q | k | v | u),
  `model.layers.N.token_mixer.out_proj.weight` [decoder_embed_dim, hidden_dim],
  `model.layers.N.token_mixer.lrpe.theta` [heads, 1, head_dim] (only the layers whose `linear_use_lrpe_list` entry
  is 1: the first layer in every published model);
- `model.layers.N.channel_mixer.{l1,l2}.weight` [glu_dim, decoder_embed_dim], `.l3.weight` [decoder_embed_dim,
  glu_dim]; `.bias` next to every linear weight when config `bias` is true (false in every published model).
  The norms (SimpleRMSNorm) have no parameters.

Why by hand: transformers has no TransNormerLLM, and the publisher's remote code (`modeling_transnormer.py`, written
for transformers 4.3x, with triton kernels and einops) does not run under transformers 5. This is a small pure-torch
reimplementation (no triton, no einops), checked to 1e-5 in fp32 against the publisher's code (tests/
test_family_transnormer.py says how). The facts it reproduces, from that code:

- Blocks: x = x + token_mixer(token_norm(x)); x = x + channel_mixer(channel_norm(x)); then final_norm and lm_head.
  The embedding output is multiplied by sqrt(decoder_embed_dim) unless `no_scale_embedding` (only for input_ids:
  the official code uses given `inputs_embeds` as they are, and so does this one).
- SimpleRMSNorm: x * rsqrt(mean(x^2) + 1e-6), computed in fp32, no weight (the triton and the torch versions agree).
- Channel mixer ("simple GLU", no activation): l3(l1(x) * l2(x)).
- Token mixer (NormLinearAttention): q, k, v, u = chunks of qkvu_proj(x); q, k, v split into heads (head_dim =
  hidden_dim / heads); q = act(q), k = act(k) with `linear_act_fun` ("swish"/"silu" in the published models,
  "none" = identity); in LRPE layers q and k become [x * cos(theta * p), x * sin(theta * p)] (head dim doubles) at
  absolute position p; causal linear attention with a per-head exponential decay:
      o_i = sum_{j <= i} exp(-s_h * (i - j)) (q_i . k_j) v_j     (no softmax, no 1/sqrt(d));
  then SimpleRMSNorm over the concatenated heads, gate (u * o, u without activation) and out_proj.
  LRPE's q.k depends only on i - j (cos(theta (i - j))), so positions may start anywhere (left padding is fine).
- Decay slopes: ALiBi's `get_slopes(heads)` (for 2^a heads: s_h = r^(h+1), r = 2^(-8 / heads)) as an fp32 tensor,
  times (1 - layer / (layers - 1) + 1e-5) for layer 0..layers-1: strong decay in the first layer, almost none in the
  last. (The official code divides by zero for a 1-layer model; here that layer gets the factor 1 + 1e-5.)
- Padding: the official code zeroes v at positions where attention_mask is 0, so they add nothing to the state; a
  left-padded row gives the logits of the same row unpadded (checked against the official code). Padded positions'
  own outputs are meaningless.
- LRPE's theta is a trained parameter, initialised to 10000 ** (-2 / D * arange(D)) viewed [heads, 1, head_dim]
  (D = heads * head_dim).
- `lm_head`: the published configs have no `tie_word_embeddings`, so transformers' default (True) ties lm_head to
  the embedding. When both names are in a checkpoint, the publisher's loading path decides which values survive
  (4.37: plain from_pretrained keeps lm_head.weight's values for both, low_cpu_mem_usage / device_map, which the
  published README uses, keeps the embedding's); here a tied model keeps the embedding's, as chatglm6b.py does.

Two forms of the linear attention, both pure torch and equal to 1e-5 in fp32 (tested):
- chunked (training, prefill): chunks of `lightning_chunk_size` (config, default 64; any value works, it need not
  divide the length): within a chunk the decay-masked quadratic form, across chunks a state
  S <- exp(-s C) S + sum_j exp(-s (C - 1 - j)) k_j^T v_j carried chunk to chunk. O(n * C) instead of O(n^2).
- recurrent (decoding): S <- exp(-s) S + k^T v; o = q S, one token at a time.
The state, decays and both forms are computed in fp32 whatever the model's dtype (the official inference code keeps
its state in fp32 too; it computes the rest of the attention in the model's dtype, so bf16 results differ a little).

Cache: `TransnormerCache` (a `transformers.cache_utils.Cache`) holds one state [batch, heads, d_k, d_v] (fp32) per
layer and the number of tokens seen (`get_seq_length()`, which is also the next LRPE position). The model creates it
(generate is told not to build a DynamicCache); `generate()` with it gives the tokens of repeated full forwards.
It can be reordered / selected / repeated along the batch (beam search), not cropped (assisted decoding).

Not supported (refused with a ValueError): norm_type other than "simplermsnorm" (the official code would use
nn.LayerNorm, with weights no published model has) and TransNormerLLM3's configs (`gate_dim`: another token mixer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

try:  # transformers' guarded init functions (they skip weights a checkpoint already filled)
    from transformers import initialization as hf_init
except ImportError:  # older transformers 5.x
    hf_init = None

from chattune.models.families.common import slice_logits_to_keep

MODEL_TYPE = "chattune_transnormer"
NORM_EPS = 1e-6  # the official SimpleRMSNorm's eps (torch and triton versions)
# config.json fields of the published checkpoints that this model reads (everything else is dropped)
PUBLISHED_FIELDS = ("vocab_size", "decoder_embed_dim", "decoder_layers", "decoder_attention_heads", "hidden_dim",
                    "glu_dim", "linear_use_lrpe_list", "linear_use_lrpe", "linear_act_fun", "no_scale_embedding",
                    "norm_type", "bias", "init_std", "add_bos_token", "pad_token_id", "bos_token_id",
                    "eos_token_id", "use_cache", "tie_word_embeddings", "torch_dtype")


class TransnormerConfig(PretrainedConfig):
    """The published TransNormerLLM config.json fields; defaults: the official configuration_transnormer.py's."""

    model_type = MODEL_TYPE
    attribute_map = {"num_hidden_layers": "decoder_layers", "hidden_size": "decoder_embed_dim",
                     "num_attention_heads": "decoder_attention_heads", "intermediate_size": "glu_dim",
                     "initializer_range": "init_std"}

    vocab_size: int = 64000
    decoder_embed_dim: int = 1024  # the residual width
    decoder_layers: int = 24
    decoder_attention_heads: int = 8
    hidden_dim: int = 1024  # the token mixer's q/k/v/u width (= decoder_embed_dim in every published model)
    glu_dim: int = 2816  # the channel mixer's inner width (-1: decoder_embed_dim)
    linear_use_lrpe_list: list[int] | None = None  # per layer 1 = LRPE; empty/None: `linear_use_lrpe` for all
    linear_use_lrpe: int = 0
    linear_act_fun: str = "silu"  # on q and k; the published models say "swish" (the same function)
    no_scale_embedding: bool = False  # False: embeddings times sqrt(decoder_embed_dim)
    norm_type: str = "simplermsnorm"
    bias: bool = False
    init_std: float = 0.02
    add_bos_token: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    use_cache: bool = True
    tie_word_embeddings: bool = True  # the published configs leave it at transformers' default (see the docstring)
    # chattune's: the chunk length of the chunked linear attention (training and prefill); any value >= 1
    lightning_chunk_size: int = 64

    def __post_init__(self, **kwargs):
        self.linear_use_lrpe_list = [] if self.linear_use_lrpe_list is None else list(self.linear_use_lrpe_list)
        super().__post_init__(**kwargs)

    def lrpe_layers(self) -> list[bool]:
        """Whether each layer uses LRPE (the official rule: the list if given, else `linear_use_lrpe` for all)."""
        flags = self.linear_use_lrpe_list or [self.linear_use_lrpe] * self.decoder_layers
        if len(flags) != self.decoder_layers:
            raise ValueError(f"TransNormerLLM: linear_use_lrpe_list has {len(flags)} entries for "
                             f"{self.decoder_layers} layers")
        return [bool(f) for f in flags]


def config_from_published(d: dict) -> TransnormerConfig:
    """A `TransnormerConfig` from a published TransNormerLLM config.json dict (model_type "transnormer")."""
    if "gate_dim" in d:
        raise ValueError("TransNormerLLM3 (gate_dim: a gated token mixer) is not supported, only TransNormerLLM 1/2")
    if d.get("norm_type", "simplermsnorm") != "simplermsnorm":
        raise ValueError(f"TransNormerLLM: norm_type={d['norm_type']!r} is not supported (only simplermsnorm)")
    missing = [k for k in ("vocab_size", "decoder_embed_dim", "decoder_layers", "decoder_attention_heads")
               if k not in d]
    if missing:
        raise ValueError(f"TransNormerLLM config.json lacks {', '.join(missing)}")
    kwargs = {k: d[k] for k in PUBLISHED_FIELDS if k in d}
    if "torch_dtype" in kwargs:
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    config = TransnormerConfig(**kwargs, architectures=["TransnormerForCausalLM"])
    config.lrpe_layers()  # validates the list's length
    return config


# --------------------------------------------------------------------------------------------------------------------
# decay slopes and the two forms of the linear attention


def alibi_slopes(n: int) -> list[float]:
    """The official `_build_slope_tensor`'s get_slopes (ALiBi's), as Python floats."""
    def power_of_2(m: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(m) - 3)))
        return [start * start ** i for i in range(m)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][:n - closest]


def layer_slopes(num_heads: int, layer_idx: int, num_layers: int) -> list[float]:
    """A layer's decay rates s_h, fp32 values as the official code computes them (fp32 tensor times the factor)."""
    factor = 1 - (layer_idx / (num_layers - 1) if num_layers > 1 else 0.0) + 1e-5
    # on the CPU explicitly: from_pretrained builds the model under a meta-device context
    return (torch.tensor(alibi_slopes(num_heads), dtype=torch.float32, device="cpu") * factor).tolist()


def recurrent_linear_attention(q, k, v, slopes, state=None):
    """One token at a time: S <- exp(-s) S + k_t^T v_t, o_t = q_t S. q, k [b, h, n, dk], v [b, h, n, dv], slopes
    [h] (fp32), state [b, h, dk, dv] or None. Returns (o [b, h, n, dv], final state), in fp32."""
    q, k, v = q.float(), k.float(), v.float()
    b, h, n, dk = q.shape
    if state is None:
        state = q.new_zeros(b, h, dk, v.shape[-1])
    ratio = torch.exp(-slopes.float()).view(1, h, 1, 1)
    outs = []
    for t in range(n):
        state = ratio * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((q[:, :, t, None, :] @ state).squeeze(2))
    out = torch.stack(outs, dim=2) if outs else v.new_zeros(b, h, 0, v.shape[-1])
    return out, state


def chunked_linear_attention(q, k, v, slopes, state=None, chunk_size: int = 64, return_state: bool = False):
    """o_i = q_i (exp(-s (i + 1)) S0 + sum_{j <= i} exp(-s (i - j)) k_j^T v_j), by chunks of `chunk_size`: the
    decay-masked quadratic form inside a chunk, a carried state across chunks. Same arguments and results as
    `recurrent_linear_attention` (the final state only with return_state, else None); fp32."""
    q, k, v = q.float(), k.float(), v.float()
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    if n == 0:
        return v.new_zeros(b, h, 0, dv), state
    s = slopes.float().view(h, 1, 1)
    c = max(1, min(int(chunk_size), n))
    chunks = -(-n // c)
    pad = chunks * c - n
    if pad:  # zero rows at the end: causal, so they change no real row; the final state is computed apart below
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    qc, kc, vc = (t.view(b, h, chunks, c, t.shape[-1]) for t in (q, k, v))
    idx = torch.arange(c, device=q.device, dtype=torch.float32)
    distance = idx[:, None] - idx[None, :]
    # exp(-s (a - b)) for b <= a, else 0 (exponent -inf, never a large positive one)
    diag = torch.exp(torch.where(distance >= 0, -s * distance, torch.full_like(distance, -math.inf)))  # [h, c, c]
    out = ((qc @ kc.transpose(-1, -2)) * diag[:, None]) @ vc  # intra-chunk
    if state is not None or chunks > 1 or return_state:
        q_decay = torch.exp(-s * (idx[:, None] + 1))  # [h, c, 1]
        k_decay = torch.exp(-s * (c - 1 - idx[:, None]))
        chunk_kv = (kc * k_decay[:, None]).transpose(-1, -2) @ vc  # [b, h, chunks, dk, dv]
        block_decay = torch.exp(-s * c)[None]  # [1, h, 1, 1]
        current = q.new_zeros(b, h, dk, dv) if state is None else state.float()
        before = []
        for i in range(chunks):
            before.append(current)
            if i + 1 < chunks:
                current = block_decay * current + chunk_kv[:, :, i]
        out = out + (qc * q_decay[:, None]) @ torch.stack(before, dim=2)  # inter-chunk
        if return_state:  # the last chunk holds m real rows (fewer than c when padded)
            m = c - pad
            kl, vl = kc[:, :, -1, :m], vc[:, :, -1, :m]
            last_decay = torch.exp(-s * (m - 1 - idx[:m, None]))
            state = torch.exp(-s * m)[None] * before[-1] + (kl * last_decay).transpose(-1, -2) @ vl
    out = out.reshape(b, h, chunks * c, dv)[:, :, :n]
    return out, (state if return_state else None)


# --------------------------------------------------------------------------------------------------------------------
# cache


class TransnormerCache(Cache):
    """Per layer the linear attention state [batch, heads, d_k, d_v] (fp32), plus the number of tokens seen."""

    is_compileable = False

    def __init__(self, num_layers: int):
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.states: list[torch.Tensor | None] = [None] * num_layers
        self.seen_tokens = 0

    def __repr__(self):
        return f"TransnormerCache(layers={self.num_layers}, seen_tokens={self.seen_tokens})"

    def __len__(self):
        return self.num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # a recurrent state has no length limit

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        if layer_idx is None:
            return all(s is not None for s in self.states)
        return self.states[layer_idx] is not None

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def is_linear(self) -> list[bool]:
        return [True] * self.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.num_layers

    @property
    def max_batch_size(self) -> int | None:
        return next((s.shape[0] for s in self.states if s is not None), None)

    def get_state(self, layer_idx: int) -> torch.Tensor | None:
        return self.states[layer_idx]

    def set_state(self, layer_idx: int, state: torch.Tensor) -> None:
        self.states[layer_idx] = state

    def update(self, *args, **kwargs):
        raise TypeError("TransnormerCache holds linear attention states, not keys/values: use get_state/set_state")

    def reset(self) -> None:
        self.states = [None] * self.num_layers
        self.seen_tokens = 0

    def _map(self, fn) -> None:
        self.states = [None if s is None else fn(s) for s in self.states]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda s: s.index_select(0, beam_idx.to(s.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda s: s[indices.to(s.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda s: s.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("TransnormerCache is a recurrent state: it cannot be cropped (no assisted decoding)")

    def activate_past_recording(self):
        raise ValueError("TransnormerCache is a recurrent state: it cannot record and crop its past")

    def offload(self, *args, **kwargs):
        pass

    def prefetch(self, *args, **kwargs):
        pass


# --------------------------------------------------------------------------------------------------------------------
# layers


class SimpleRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps), in fp32, cast back; no weight (the official SimpleRMSNorm)."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def activation(name: str):
    """The official get_activation_fn (an unknown name is the identity there too, e.g. "none")."""
    name = (name or "none").lower()
    if name in ("silu", "swish"):
        return F.silu
    table = {"gelu": F.gelu, "relu": F.relu, "elu": F.elu, "sigmoid": torch.sigmoid, "leak": F.leaky_relu,
             "sine": torch.sin, "1+elu": lambda x: 1 + F.elu(x), "2+elu": lambda x: 2 + F.elu(x),
             "exp": lambda x: torch.exp(x - x.amax(dim=-1, keepdim=True).detach())}
    return table.get(name, lambda x: x)


def lrpe_theta_init(num_heads: int, head_dim: int, device=None) -> torch.Tensor:
    d = num_heads * head_dim
    return (10000 ** (-2 / d * torch.arange(d, device=device))).reshape(num_heads, 1, -1)


class Lrpe(nn.Module):
    """Linearized relative positional encoding: x [b, h, n, d] -> [x cos(theta p), x sin(theta p)] [b, h, n, 2d] at
    positions p = offset + 0..n-1 (computed in fp32)."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.theta = nn.Parameter(lrpe_theta_init(num_heads, head_dim))

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        positions = torch.arange(offset, offset + x.shape[-2], device=x.device, dtype=torch.float32)
        angle = self.theta.float() * positions[:, None]  # [h, n, d]
        x = x.float()
        return torch.cat([x * torch.cos(angle), x * torch.sin(angle)], dim=-1)


class NormLinearAttention(nn.Module):
    """The token mixer (names as the official module: qkvu_proj, out_proj, lrpe)."""

    def __init__(self, config: TransnormerConfig, layer_idx: int, use_lrpe: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.decoder_attention_heads
        if config.hidden_dim % self.num_heads:
            raise ValueError(f"TransNormerLLM: hidden_dim {config.hidden_dim} is not a multiple of "
                             f"decoder_attention_heads {self.num_heads}")
        self.head_dim = config.hidden_dim // self.num_heads
        self.qkvu_proj = nn.Linear(config.decoder_embed_dim, 4 * config.hidden_dim, bias=config.bias)
        self.out_proj = nn.Linear(config.hidden_dim, config.decoder_embed_dim, bias=config.bias)
        self.norm = SimpleRMSNorm(config.hidden_dim)
        self.act = activation(config.linear_act_fun)
        self.lrpe = Lrpe(self.num_heads, self.head_dim) if use_lrpe else None
        self.slopes = layer_slopes(self.num_heads, layer_idx, config.decoder_layers)  # Python floats (fp32 values)
        self.chunk_size = config.lightning_chunk_size
        self.mode = "auto"  # "chunked" / "recurrent" force one form (tests); auto: recurrent for short cached steps

    def forward(self, x, attention_mask=None, past_key_values: TransnormerCache | None = None, offset: int = 0):
        b, n, _ = x.shape
        q, k, v, u = self.qkvu_proj(x).chunk(4, dim=-1)
        q, k, v = (t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = self.act(q), self.act(k)
        if self.lrpe is not None:
            q, k = self.lrpe(q, offset), self.lrpe(k, offset)
        if attention_mask is not None:  # padding adds nothing to the state (the official code zeroes v)
            v = v.masked_fill(~attention_mask[:, None, :, None], 0)
        slopes = torch.tensor(self.slopes, dtype=torch.float32, device=x.device)
        state = past_key_values.get_state(self.layer_idx) if past_key_values is not None else None
        mode = self.mode
        if mode == "auto":
            mode = "recurrent" if state is not None and n <= 4 else "chunked"
        if mode == "recurrent":
            out, state = recurrent_linear_attention(q, k, v, slopes, state)
        else:
            out, state = chunked_linear_attention(q, k, v, slopes, state, self.chunk_size,
                                                  return_state=past_key_values is not None)
        if past_key_values is not None:
            past_key_values.set_state(self.layer_idx, state)
        out = self.norm(out.transpose(1, 2).reshape(b, n, -1)).to(u.dtype)
        return self.out_proj(u * out)


class GLU(nn.Module):
    """The channel mixer: l3(l1(x) * l2(x)), no activation."""

    def __init__(self, dim: int, inner: int, bias: bool):
        super().__init__()
        self.l1 = nn.Linear(dim, inner, bias=bias)
        self.l2 = nn.Linear(dim, inner, bias=bias)
        self.l3 = nn.Linear(inner, dim, bias=bias)

    def forward(self, x):
        return self.l3(self.l1(x) * self.l2(x))


class TransnormerDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: TransnormerConfig, layer_idx: int, use_lrpe: bool):
        super().__init__()
        dim = config.decoder_embed_dim
        self.token_norm = SimpleRMSNorm(dim)
        self.token_mixer = NormLinearAttention(config, layer_idx, use_lrpe)
        self.channel_norm = SimpleRMSNorm(dim)
        self.channel_mixer = GLU(dim, dim if config.glu_dim == -1 else config.glu_dim, config.bias)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None, offset: int = 0):
        hidden_states = hidden_states + self.token_mixer(self.token_norm(hidden_states), attention_mask,
                                                         past_key_values, offset)
        return hidden_states + self.channel_mixer(self.channel_norm(hidden_states))


# --------------------------------------------------------------------------------------------------------------------
# models


class TransnormerPreTrainedModel(PreTrainedModel):
    config_class = TransnormerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransnormerDecoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"decoder\.version"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Lrpe):
            h, _, head_dim = module.theta.shape
            value = lrpe_theta_init(h, head_dim, module.theta.device).to(module.theta.dtype)
            if hf_init is not None:
                hf_init.copy_(module.theta, value)
            elif not getattr(module.theta, "_is_hf_initialized", False):
                with torch.no_grad():
                    module.theta.copy_(value)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not build a DynamicCache: the model creates its TransnormerCache


class TransnormerModel(TransnormerPreTrainedModel):
    """The decoder (`model.*` in the checkpoint): embeddings, layers, final norm."""

    def __init__(self, config: TransnormerConfig):
        super().__init__(config)
        if config.norm_type != "simplermsnorm":
            raise ValueError(f"TransNormerLLM: norm_type={config.norm_type!r} is not supported")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.decoder_embed_dim, config.pad_token_id)
        self.layers = nn.ModuleList(TransnormerDecoderLayer(config, i, lrpe)
                                    for i, lrpe in enumerate(config.lrpe_layers()))
        self.final_norm = SimpleRMSNorm(config.decoder_embed_dim)
        self.embed_scale = 1.0 if config.no_scale_embedding else math.sqrt(config.decoder_embed_dim)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, **kwargs) -> BaseModelOutputWithPast:
        """attention_mask: 2-D, 1 = real token, 0 = padding, over the new tokens or past + new (its last columns are
        used). position_ids are accepted and ignored: positions are the cache's count of seen tokens onwards."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # a state written during the recompute would be updated twice
        if not use_cache:
            past_key_values = None
        elif past_key_values is None:
            past_key_values = TransnormerCache(self.config.decoder_layers)
        elif not isinstance(past_key_values, TransnormerCache):
            raise TypeError(f"TransNormerLLM needs a TransnormerCache, got {type(past_key_values).__name__}")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids) * self.embed_scale  # given embeddings are used as they are
        n = inputs_embeds.shape[1]
        offset = past_key_values.get_seq_length() if past_key_values is not None else 0

        mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("TransNormerLLM takes a 2-D attention_mask [batch, (past +) seq] (1 = real token)")
            mask = attention_mask[:, -n:].to(device=inputs_embeds.device, dtype=torch.bool)
            if bool(mask.all()):
                mask = None

        hidden_states = inputs_embeds
        all_hidden = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states = layer(hidden_states, attention_mask=mask, past_key_values=past_key_values, offset=offset)
        if past_key_values is not None:
            past_key_values.seen_tokens += n
        hidden_states = self.final_norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values,
                                       hidden_states=all_hidden)


class TransnormerForCausalLM(TransnormerPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TransnormerConfig):
        super().__init__(config)
        self.model = TransnormerModel(config)
        self.lm_head = nn.Linear(config.decoder_embed_dim, config.vocab_size, bias=False)
        # a tied model keeps the embedding's values when a checkpoint holds a separate lm_head.weight
        self.register_load_state_dict_pre_hook(self._drop_tied_head)
        self.post_init()

    def _drop_tied_head(self, module, state_dict, prefix, *args):
        embeddings = prefix + "model.embed_tokens.weight"
        if self.config.tie_word_embeddings and embeddings in state_dict:
            # both names load into the one shared tensor; the embedding's values must win (not the order of loading)
            state_dict[prefix + "lm_head.weight"] = state_dict[embeddings]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers 5 leaves the weights untied when a checkpoint holds a different lm_head.weight; tie them
        afterwards, embeddings winning (see the module docstring)."""
        model = super().from_pretrained(*args, **kwargs)
        head = model[0] if isinstance(model, tuple) else model  # output_loading_info=True
        if head.config.tie_word_embeddings and head.lm_head.weight is not head.model.embed_tokens.weight:
            head.lm_head.weight = head.model.embed_tokens.weight
        return model

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model

    def set_decoder(self, decoder):
        self.model = decoder

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None,
                logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states)
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states)


def register() -> None:
    """Register the config and models with transformers' Auto classes (idempotent)."""
    AutoConfig.register(MODEL_TYPE, TransnormerConfig, exist_ok=True)
    AutoModel.register(TransnormerConfig, TransnormerModel, exist_ok=True)
    AutoModelForCausalLM.register(TransnormerConfig, TransnormerForCausalLM, exist_ok=True)


register()
