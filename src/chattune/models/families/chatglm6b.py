"""ChatGLM-6B (GLM v1, THUDM/chatglm-6b) as chattune's own transformers model.

What: `ChatGLM6BConfig` and `ChatGLM6BForCausalLM`, registered with transformers' Auto classes under the model type
"chattune_chatglm6b" (not "chatglm": ChatGLM2/3 and GLM-4 use that type and are converted to transformers' Glm in
`glm.py`). The model loads the published checkpoint's weights as they are, under the same names
(`transformer.word_embeddings.weight`, `transformer.layers.N.{input_layernorm,post_attention_layernorm}.{weight,bias}`,
`transformer.layers.N.attention.{query_key_value,dense}.{weight,bias}`,
`transformer.layers.N.mlp.{dense_h_to_4h,dense_4h_to_h}.{weight,bias}`, `transformer.final_layernorm.{weight,bias}`,
`lm_head.weight`; the published `transformer.layers.N.attention.rotary_emb.inv_freq` buffers are accepted and
ignored, as the publisher's code ignores them).

Why by hand: transformers has no ChatGLM-6B, and the publisher's remote code (`modeling_chatglm.py`, written for
transformers 4.2x) does not run under transformers 5. The architecture differs from every native model (2-D rotary
positions, prefix attention, scaled residuals), so it cannot be converted to one either. This is a small pure-torch
reimplementation (SDPA attention, transformers' `DynamicCache`), checked to 1e-5 in fp32 against the publisher's code
(tests/test_family_chatglm6b.py says how). The facts it reproduces, from that code:

- Positions are 2-D. For a sequence whose context ends at `<sop>` (bos_token_id, at index c) and whose mask token is
  at index m (the first `[gMASK]` (gmask_token_id) if there is one, else the first `[MASK]` (mask_token_id)):
  position = i for i < c, else m; block position = 0 for i < c, else i - c + 1 (the official `get_position_ids`).
- Rotary embedding on two halves of each head: the first half rotated by the position, the second by the block
  position, each with the non-interleaved `rotate_half` (x1, x2 = halves; (-x2, x1)) over dim = head_dim / 2 and
  inv_freq = 1 / 10000 ** (arange(0, dim, 2) / dim) stored in fp16 (the official buffer is `.half()`; we use those
  rounded values in fp32).
- Prefix attention: every token sees the whole context (the tokens before `<sop>`, bidirectionally) and the tokens
  up to itself (the official `get_masks`). Equivalently: key j is visible to query i when j <= i or j's block
  position is 0, which is how the mask is built here (it then also follows user-given position_ids).
- Pre-LayerNorm blocks (LayerNorm with bias) whose residual is the *normalized* input scaled by
  alpha = sqrt(2 * num_layers): h = alpha * ln1(x) + attn(ln1(x)); out = alpha * ln2(h) + mlp(ln2(h)). Careful: the
  official `ChatGLMModel` never passes num_layers to its `GLMBlock`s, so alpha is always sqrt(2 * 28) (GLMBlock's
  default), whatever config.num_layers says. The config field `alpha_num_layers` (default 28) keeps that; it only
  matters for models with another depth (e.g. the tiny twin in the tests, which follows the official code).
- MLP: dense_h_to_4h (to inner_hidden_size) -> GELU in its tanh form (the official `gelu_impl`) -> dense_4h_to_h, with
  biases.
- query_key_value rows are per head [q_h | k_h | v_h] (the output viewed as [heads, 3 * head_dim] and split).
- Attention scores: the official code divides the query by sqrt(head_dim) * (layer_id + 1) and multiplies the fp32
  scores by (layer_id + 1) before the softmax (`query_key_layer_scaling_coeff`): the standard 1/sqrt(head_dim)
  attention, which SDPA computes.
- `lm_head` (no bias) is a separate tensor in the checkpoint, but the published config has no `tie_word_embeddings`,
  so transformers 4.2x's `from_pretrained` ties it to `word_embeddings` and the checkpoint's `lm_head.weight` is
  discarded (verified with the publisher's code). `config_from_published` therefore ties by default, and a tied model
  replaces `lm_head.weight` by the embedding when loading a
  state dict, so it computes what the published model computes.

Padding: an `attention_mask` (1 real, 0 padding; any side) is honoured exactly: positions and the prefix are computed
over each row's real tokens, so a padded row gives the logits of the same row unpadded (padded rows' outputs are
meaningless). With a non-empty cache, position_ids must be given (`prepare_inputs_for_generation` computes them from
the whole sequence) and the new tokens must lie after `<sop>`, as in generation.

Not supported (refused with a ValueError): position_encoding_2d=False, P-tuning prefixes (pre_seq_len) and quantized
checkpoints (quantization_bit). In fp16/bf16 the rotary tables are computed in fp32 and cast, where the official code
computes them in fp16 (and in bf16 loses integer positions above 256).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from chattune.models.families.common import slice_logits_to_keep

MODEL_TYPE = "chattune_chatglm6b"
ROPE_BASE = 10000.0
# config.json fields of the published checkpoint that this model reads (everything else is passed through)
PUBLISHED_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "inner_hidden_size",
                    "layernorm_epsilon", "max_sequence_length", "position_encoding_2d", "bos_token_id",
                    "eos_token_id", "pad_token_id", "mask_token_id", "gmask_token_id", "use_cache",
                    "tie_word_embeddings", "torch_dtype")


class ChatGLM6BConfig(PretrainedConfig):
    """The published ChatGLM-6B config.json fields (defaults: THUDM/chatglm-6b's values)."""

    model_type = MODEL_TYPE
    attribute_map = {"num_hidden_layers": "num_layers", "max_position_embeddings": "max_sequence_length",
                     "intermediate_size": "inner_hidden_size"}

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int | None = 130004  # <sop>: the context ends here
    eos_token_id: int | list[int] | None = 130005  # <eop>
    pad_token_id: int | None = 3
    mask_token_id: int = 130000  # [MASK]
    gmask_token_id: int = 130001  # [gMASK]
    use_cache: bool = True
    tie_word_embeddings: bool = True  # what the published config means (see the module docstring)
    initializer_range: float = 0.02
    # the residual scale is sqrt(2 * alpha_num_layers): the official code hard-codes 28 (see the module docstring)
    alpha_num_layers: int = 28


def config_from_published(d: dict) -> ChatGLM6BConfig:
    """A `ChatGLM6BConfig` from a published ChatGLM-6B config.json dict (model_type "chatglm", GLM v1 fields)."""
    if not d.get("position_encoding_2d", True):
        raise ValueError("ChatGLM-6B: position_encoding_2d=false (1-D positions) is not supported")
    if d.get("pre_seq_len") is not None:
        raise ValueError(f"ChatGLM-6B: pre_seq_len={d['pre_seq_len']} (a P-tuning v2 prefix) is not supported")
    if d.get("quantization_bit"):
        raise ValueError(f"ChatGLM-6B: quantization_bit={d['quantization_bit']} (quantized weights) is not supported")
    missing = [k for k in ("hidden_size", "num_layers", "num_attention_heads", "vocab_size") if k not in d]
    if missing:
        raise ValueError(f"ChatGLM-6B config.json lacks {', '.join(missing)}")
    kwargs = {k: d[k] for k in PUBLISHED_FIELDS if k in d}
    if "torch_dtype" in kwargs:
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    kwargs.setdefault("inner_hidden_size", 4 * d["hidden_size"])  # the official GLU's default
    return ChatGLM6BConfig(**kwargs, architectures=["ChatGLM6BForCausalLM"])


# --------------------------------------------------------------------------------------------------------------------
# positions and mask


def position_ids_from_input_ids(input_ids: torch.Tensor, config: ChatGLM6BConfig,
                                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The official 2-D positions, [batch, 2, seq] (position, block position), over each row's real tokens.

    Padding (attention_mask 0) is skipped: real tokens get the positions of the row without its padding, padding gets
    (0, 0), as the official tokenizer pads position ids."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    compact = (real.long().cumsum(1) - 1).clamp(min=0)  # index among the row's real tokens
    is_bos = (input_ids == config.bos_token_id) & real
    is_gmask = (input_ids == config.gmask_token_id) & real
    is_mask = (input_ids == config.mask_token_id) & real
    marks = torch.where(is_gmask.any(1, keepdim=True), is_gmask, is_mask)  # [gMASK] wins, as in the official code
    for name, present, token in (("<sop> (bos_token_id)", is_bos, config.bos_token_id),
                                 ("[gMASK]/[MASK] (gmask_token_id/mask_token_id)", marks, None)):
        rows = (~present.any(1)).nonzero().flatten().tolist()
        if rows:
            what = f"{name}={token}" if token is not None else name
            raise ValueError(f"ChatGLM-6B needs {what} in every sequence (the official get_position_ids does): "
                             f"missing in batch rows {rows}")
    # argmax of a 0/1 tensor is the first 1: the official code uses the first occurrence (list.index)
    context = compact.gather(1, is_bos.long().argmax(1, keepdim=True))
    mask_position = compact.gather(1, marks.long().argmax(1, keepdim=True))
    in_context = compact < context
    position = torch.where(in_context, compact, mask_position)
    block = torch.where(in_context, torch.zeros_like(compact), compact - context + 1)
    return torch.stack((position * real, block * real), dim=1)


def attention_mask_4d(position_ids: torch.Tensor, key_mask: torch.Tensor, past_length: int) -> torch.Tensor:
    """Boolean [batch, 1, q, past + q] mask (True = attend): key j is visible to query i when j is real and j <= i
    (every cached key: a generation cache or a P-tuning prefix) or j is a new token in the context (block position
    0: the prompt before `<sop>`, seen bidirectionally). Every query also sees itself, so padded queries get a finite
    (and unused) output instead of NaN."""
    q = position_ids.shape[-1]
    total = past_length + q
    rows = torch.arange(past_length, total, device=key_mask.device)[:, None]
    cols = torch.arange(total, device=key_mask.device)[None, :]
    visible = (cols <= rows)[None]
    context = torch.cat([torch.zeros(position_ids.shape[0], past_length, dtype=torch.bool, device=key_mask.device),
                         position_ids[:, 1] == 0], dim=1)
    visible = visible | context[:, None, :]
    visible = (visible & key_mask.bool()[:, None, :]) | (cols == rows)[None]
    return visible[:, None]


# --------------------------------------------------------------------------------------------------------------------
# layers


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The official `gelu_impl` (OpenAI's tanh approximation), written out to keep its exact constants."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for one half of a head. No parameters or buffers: the checkpoint's `inv_freq` is ignored on
    load, as the official `RotaryEmbedding._load_from_state_dict` does, and recomputed here (cheap, and never cast
    to a low precision by `.to(dtype)` or left on the meta device by from_pretrained)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        pass  # the published `inv_freq` buffer: accepted, not used

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [b, s] -> cos, sin [b, s, dim]."""
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device=positions.device) / self.dim
        inv_freq = (1.0 / ROPE_BASE ** exponent).half().float()  # the official buffer is fp16
        freqs = positions.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class ChatGLM6BAttention(nn.Module):
    def __init__(self, config: ChatGLM6BConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(self.head_dim // 2)

    def _rotate(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """x [b, s, heads, head_dim]: first half by position, second half by block position."""
        halves = []
        for half, positions in zip(x.chunk(2, dim=-1), position_ids.unbind(1)):
            cos, sin = self.rotary_emb(positions, x.dtype)
            cos, sin = cos[:, :, None], sin[:, :, None]
            halves.append(half * cos + rotate_half(half) * sin)
        return torch.cat(halves, dim=-1)

    def forward(self, hidden_states, position_ids, attention_mask, past_key_values: Cache | None = None):
        b, s, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(b, s, self.num_heads, 3 * self.head_dim)
        query, key, value = qkv.split(self.head_dim, dim=-1)  # per head [q_h | k_h | v_h]
        query, key = self._rotate(query, position_ids), self._rotate(key, position_ids)
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))  # [b, heads, s, head_dim]
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        # the official layer scaling (divide by layer_id + 1, multiply back in fp32) is 1/sqrt(head_dim) attention
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        return self.dense(out.transpose(1, 2).reshape(b, s, -1))


class ChatGLM6BMLP(nn.Module):
    def __init__(self, config: ChatGLM6BConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(gelu_tanh(self.dense_h_to_4h(x)))


class ChatGLM6BBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLM6BConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = ChatGLM6BAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = ChatGLM6BMLP(config)
        self.alpha = math.sqrt(2 * config.alpha_num_layers)  # not num_layers: the official code uses 28

    def forward(self, hidden_states, position_ids=None, attention_mask=None, past_key_values=None):
        # GLM's residual is the *normalized* input, scaled by alpha (the official GLMBlock)
        attention_input = self.input_layernorm(hidden_states)
        attention_output = self.attention(attention_input, position_ids, attention_mask, past_key_values)
        hidden_states = attention_input * self.alpha + attention_output
        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * self.alpha + self.mlp(mlp_input)


# --------------------------------------------------------------------------------------------------------------------
# models


class ChatGLM6BPreTrainedModel(PreTrainedModel):
    config_class = ChatGLM6BConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ChatGLM6BBlock"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq$"]


class ChatGLM6BModel(ChatGLM6BPreTrainedModel):
    """The transformer (`transformer.*` in the checkpoint): embeddings, blocks, final LayerNorm."""

    def __init__(self, config: ChatGLM6BConfig):
        super().__init__(config)
        if not config.position_encoding_2d:
            raise ValueError("ChatGLM-6B: position_encoding_2d=False (1-D positions) is not supported")
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ChatGLM6BBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # a cache written during the recompute would be updated twice
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        # a given cache is used even with use_cache=False: in training it is a P-tuning prefix (peft passes one)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        b, s = inputs_embeds.shape[:2]
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0

        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("ChatGLM-6B takes a 2-D attention_mask [batch, past + seq] (1 = real token, 0 = padding)")
        if attention_mask is None:
            attention_mask = torch.ones(b, past_length + s, dtype=torch.bool, device=inputs_embeds.device)
        if position_ids is None:
            if input_ids is None:
                raise ValueError("ChatGLM-6B with inputs_embeds needs position_ids [batch, 2, seq]")
            if past_length and not bool((input_ids == self.config.bos_token_id).any(1).all()):
                raise ValueError("ChatGLM-6B with a non-empty cache needs position_ids (2-D positions depend on the "
                                 "whole sequence; prepare_inputs_for_generation computes them)")
            # no cache, or a cache that is a P-tuning prefix in front of a whole prompt: positions of the new tokens
            position_ids = position_ids_from_input_ids(input_ids, self.config, attention_mask[:, past_length:])
        if position_ids.dim() != 3 or position_ids.shape[1] != 2:
            raise ValueError(f"ChatGLM-6B position_ids must be [batch, 2, seq], got {tuple(position_ids.shape)}")
        mask = attention_mask_4d(position_ids, attention_mask, past_length)

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_ids=position_ids, attention_mask=mask,
                                  past_key_values=past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=self.final_layernorm(hidden_states),
                                       past_key_values=past_key_values if use_cache else None)


class ChatGLM6BForCausalLM(ChatGLM6BPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLM6BConfig):
        super().__init__(config)
        self.transformer = ChatGLM6BModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # a tied model ignores the checkpoint's separate lm_head.weight values, as the published loading path does
        self.register_load_state_dict_pre_hook(self._drop_tied_head)
        self.post_init()

    def _drop_tied_head(self, module, state_dict, prefix, *args):
        embeddings = prefix + "transformer.word_embeddings.weight"
        if self.config.tie_word_embeddings and embeddings in state_dict:
            # both names load into the one shared tensor; the embedding's values must win (not the order of loading)
            state_dict[prefix + "lm_head.weight"] = state_dict[embeddings]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers 5 leaves the weights untied when a checkpoint holds a different lm_head.weight (the published
        one does); tie them afterwards, embeddings winning, as the published loading path (4.2x) does."""
        model = super().from_pretrained(*args, **kwargs)
        if isinstance(model, tuple):  # output_loading_info=True
            head = model[0]
        else:
            head = model
        if head.config.tie_word_embeddings and head.lm_head.weight is not head.transformer.word_embeddings.weight:
            head.lm_head.weight = head.transformer.word_embeddings.weight
        return model

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, past_key_values=None,
                                      attention_mask=None, **kwargs):
        """The generic preparation plus the 2-D positions, computed over the whole sequence so far (as the official
        code does) and sliced to the tokens this step feeds."""
        inputs = super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length,
                                                       past_key_values=past_key_values,
                                                       attention_mask=attention_mask, **kwargs)
        given = kwargs.get("position_ids")
        # generate makes 1-D position ids from the attention mask; ChatGLM-6B's are 2-D and depend on the tokens
        if (given is None or given.dim() != 3) and inputs.get("input_ids") is not None:
            # the mask may be longer than input_ids: peft's P-tuning prepends its prefix's columns
            mask = attention_mask[:, -input_ids.shape[1]:] if attention_mask is not None else None
            positions = position_ids_from_input_ids(input_ids, self.config, mask)
            inputs["position_ids"] = positions[..., -inputs["input_ids"].shape[1]:].contiguous()
        return inputs


def register() -> None:
    """Register the config and models with transformers' Auto classes (idempotent)."""
    AutoConfig.register(MODEL_TYPE, ChatGLM6BConfig, exist_ok=True)
    AutoModel.register(ChatGLM6BConfig, ChatGLM6BModel, exist_ok=True)
    AutoModelForCausalLM.register(ChatGLM6BConfig, ChatGLM6BForCausalLM, exist_ok=True)


register()
