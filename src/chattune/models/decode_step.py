"""chattune's own decode step for decoders laid out as Llama: one new token per row, the same maths as
transformers' forward with about a third of its per-layer Python.

Why by hand: on a CPU a small model's decode step is dominated by per-call overhead, not arithmetic. transformers'
forward runs some 50 tensor ops and module calls per layer for one token (mask building, cache bookkeeping,
keyword plumbing, hooks); on the bundled model that is about half of a 28 ms step even with the packed kernels
(models/packed.py). This step calls the same modules for everything that carries weights or choices — the
embeddings, the rotary embedding (so every RoPE scaling variant is the model's own), each projection (packed,
fp32 or a LoRA layer alike) and the MLP's activation — and does the rest (RMSNorm as transformers computes it,
rotary application, the cache append, attention through torch's SDPA) in a few plain ops. A layer whose seven
projections are all packed (models/packed.py) runs as two C calls (`layer_front`, `layer_back`) around the cache
append, the rest of its maths included.

It is used only for what it was checked on: models whose config says Llama, Mistral (without a sliding window) or
Qwen2 (without one in use), run as peft LoRA or plain, whose layers have the Llama shape; and the serve worker
turns it on only after `engine.step_matches_transformers` has found its logits equal to transformers' own on the loaded
model (two prompts of different lengths, padded, over several steps). Anything else decodes through transformers.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

MODEL_TYPES = ("llama", "mistral", "qwen2")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj", "act_fn")


def _projection(module):
    """The callable for one projection: the packed kernel directly for a plain packed nn.Linear without hooks
    (skipping the module call), the module itself otherwise (fp32 Linear, peft LoRA layer, quantised layer)."""
    packed = getattr(module, "_chattune_packed", None)
    if packed is None or type(module) is not torch.nn.Linear or module._forward_hooks or module._forward_pre_hooks:
        return module
    from chattune.models.packed import packed_linear
    out, bias = module.out_features, module.bias
    return lambda x: packed_linear(x, packed, out, bias)


def _fused(modules):
    """One kernel call for projections that read the same input (q/k/v, gate/up): their packed rows stacked, where
    each is a plain packed nn.Linear of one kind. The layers' own packed weights become views of the stacked rows,
    so nothing is held twice. None where they cannot be fused."""
    if any(_projection(m) is m for m in modules):
        return None
    from chattune.models.packed import Packed, packed_linear
    packs = [m._chattune_packed for m in modules]
    if len({p.kind for p in packs}) != 1 or len({p.data.shape[1] for p in packs}) != 1:
        return None
    stacked, start = Packed(packs[0].kind, torch.cat([p.data for p in packs])), 0
    for m in modules:
        m._chattune_packed = Packed(stacked.kind, stacked.data[start:start + m.out_features])
        start += m.out_features
    bias = None if all(m.bias is None for m in modules) else \
        torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules])
    fused = lambda x: packed_linear(x, stacked, start, bias)  # noqa: E731
    fused.packed, fused.bias = stacked, bias  # for the native layer below
    return fused


def _packed_args(module) -> tuple | None:
    """(kind 4|8, blocks address, bias address or None) of a plain packed nn.Linear without hooks, else None."""
    if _projection(module) is module:
        return None
    packed = module._chattune_packed
    return 4 if packed.kind == "q4" else 8, packed.ptr, None if module.bias is None else module.bias.data_ptr()


class _Layer:
    __slots__ = ("q", "k", "v", "o", "gate", "up", "down", "act", "norm1", "eps1", "norm2", "eps2", "head_dim",
                 "scaling", "qkv", "gate_up", "q_heads", "qk_heads", "native", "keep")

    def __init__(self, layer):
        a, mlp = layer.self_attn, layer.mlp
        self.qkv, self.gate_up = _fused([a.q_proj, a.k_proj, a.v_proj]), _fused([mlp.gate_proj, mlp.up_proj])
        self.q_heads = a.q_proj.out_features // a.head_dim
        self.qk_heads = self.q_heads + a.k_proj.out_features // a.head_dim
        self.q, self.k, self.v, self.o = (_projection(getattr(a, n)) for n in _ATTENTION)
        self.gate, self.up, self.down = (_projection(getattr(mlp, n)) for n in _MLP[:3])
        self.act = mlp.act_fn
        self.norm1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.norm2, self.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
        self.head_dim, self.scaling = a.head_dim, a.scaling
        self.native = self._native(a, mlp)

    def _native(self, a, mlp) -> tuple | None:
        """The arguments of the C layer (models/packed.py: layer_front, layer_back) where all seven projections
        are packed, q/k/v and gate/up fused, and the activation is SiLU; else None (this layer runs in torch)."""
        o, down = _packed_args(a.o_proj), _packed_args(mlp.down_proj)
        if self.qkv is None or self.gate_up is None or o is None or down is None \
                or not isinstance(self.act, torch.nn.SiLU) and type(self.act).__name__ != "SiLUActivation" \
                or self.norm1.dtype != torch.float32 or self.head_dim % 2:
            return None
        qkv, gu = self.qkv, self.gate_up
        self.keep = [t for t in (qkv.bias, gu.bias) if t is not None]  # the fused biases live as long as the layer
        address = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        kind = lambda p: 4 if p.kind == "q4" else 8  # noqa: E731
        front = (self.norm1.data_ptr(), self.eps1, kind(qkv.packed), qkv.packed.ptr, a.q_proj.out_features
                 + a.k_proj.out_features + a.v_proj.out_features, address(qkv.bias))
        back = (o, (self.norm2.data_ptr(), self.eps2), (kind(gu.packed), gu.packed.ptr, address(gu.bias)),
                mlp.down_proj.in_features, down)
        return front, back


def why_not(model) -> str | None:
    """Why this step cannot drive `model` (None: it can, subject to `matches_transformers`)."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return "a P-tuning v2 prefix"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in MODEL_TYPES:
        return f"model type {kind!r} (chattune's step knows {', '.join(MODEL_TYPES)})"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    inner = getattr(base, "model", None)
    if not all(hasattr(inner, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")) \
            or not hasattr(base, "lm_head"):
        return f"{type(base).__name__} is not laid out as LlamaForCausalLM"
    for layer in inner.layers:
        a, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
        if not (all(hasattr(a, n) for n in _ATTENTION + ("head_dim", "scaling"))
                and all(hasattr(mlp, n) for n in _MLP)
                and all(hasattr(n, "weight") and hasattr(n, "variance_epsilon") for n in norms)) \
                or hasattr(a, "q_norm"):
            return f"{type(layer).__name__} is not laid out as LlamaDecoderLayer"
    return None


class DecodeStep:
    """`step(ids [B, 1], mask [B, T], positions [B, 1], cache)` -> next-token logits [B, V] (fp32), appending each
    layer's new key and value to `cache` (a DynamicCache with plain layers, as the serve engine keeps it)."""

    def __init__(self, model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner = base.model
        self.embed, self.rotary = inner.embed_tokens, inner.rotary_emb
        self.layers = [_Layer(layer) for layer in inner.layers]
        self.norm, self.eps = inner.norm.weight, inner.norm.variance_epsilon
        self.head = _projection(base.lm_head)
        self.dtype = self.norm.dtype

    @classmethod
    def of(cls, model) -> "DecodeStep | None":  # noqa: D102
        return None if why_not(model) else cls(model)

    def _rms(self, x, weight, eps):  # transformers' LlamaRMSNorm, op for op (fp32 statistics)
        if x.dtype == torch.float32:
            return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def __call__(self, ids, mask, positions, cache) -> torch.Tensor:
        x = self.embed(ids)
        b = x.shape[0]
        cos, sin = self.rotary(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        # One query per row attends to every unmasked cached slot; with no padded slot, no mask at all.
        attend = None if bool(mask.all()) else mask[:, None, None, :].bool()
        half = self.layers[0].head_dim // 2

        def rotate(t):
            return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin

        native = None
        for layer, kv in zip(self.layers, cache.layers):
            if layer.native is not None:
                if native is None:
                    native = _NativeStep(x, cos, sin, mask, attend is None)
                x = native.layer(layer, kv, x)
                continue
            h = self._rms(x, layer.norm1, layer.eps1)
            if layer.qkv is not None:  # one call; the rotation on q's and k's heads at once
                qkv = layer.qkv(h).view(b, 1, -1, layer.head_dim).transpose(1, 2)
                qk, v = rotate(qkv[:, :layer.qk_heads]), qkv[:, layer.qk_heads:]
                q, k = qk[:, :layer.q_heads], qk[:, layer.q_heads:]
            else:
                q = rotate(layer.q(h).view(b, 1, -1, layer.head_dim).transpose(1, 2))
                k = rotate(layer.k(h).view(b, 1, -1, layer.head_dim).transpose(1, 2))
                v = layer.v(h).view(b, 1, -1, layer.head_dim).transpose(1, 2)
            kv.keys = torch.cat([kv.keys, k], dim=-2)
            kv.values = torch.cat([kv.values, v], dim=-2)
            o = F.scaled_dot_product_attention(q, kv.keys, kv.values, attn_mask=attend, scale=layer.scaling,
                                               enable_gqa=q.shape[1] != k.shape[1])
            x = x + layer.o(o.transpose(1, 2).reshape(b, 1, -1))
            h = self._rms(x, layer.norm2, layer.eps2)
            if layer.gate_up is not None:
                gate, up = layer.gate_up(h).chunk(2, dim=-1)
            else:
                gate, up = layer.gate(h), layer.up(h)
            x = x + layer.down(layer.act(gate) * up)
        return self.head(self._rms(x, self.norm, self.eps))[:, -1, :].float()


class _NativeStep:
    """The C layer's per-step arguments: its own x [B, H] (updated in place by each C layer), cos/sin [B, hd], the
    mask [B, T] as int64 (NULL when no slot is padded), the thread count."""

    def __init__(self, x, cos, sin, mask, unpadded: bool):
        from chattune.models.packed import _LIB, _library

        self.lib = _LIB or _library()
        self.b, self.width = x.shape[0], x.shape[-1]
        self.x, self.shape = torch.empty(self.b, self.width), x.shape
        self.cos, self.sin = cos.reshape(self.b, -1).contiguous(), sin.reshape(self.b, -1).contiguous()
        self.mask = None if unpadded else mask.to(torch.int64).contiguous()
        self.threads = torch.get_num_threads()

    def layer(self, layer, kv, x: torch.Tensor) -> torch.Tensor:
        """Layer `layer` on the hidden states `x` (the previous layer's output); returns the new ones."""
        if x.data_ptr() != self.x.data_ptr():  # the embeddings, or the output of a layer that ran in torch
            self.x.copy_(x.reshape(self.b, self.width))
        (norm1, eps1, kind, blocks, width, bias), (o, (norm2, eps2), gate_up, inter, down) = layer.native
        b, hd = self.b, layer.head_dim
        y = torch.empty(b, width)
        self.lib.layer_front(self.x.data_ptr(), b, self.width, norm1, eps1, kind, blocks, width, bias,
                             self.cos.data_ptr(), self.sin.data_ptr(), hd, layer.qk_heads, y.data_ptr(), self.threads)
        heads = y.view(b, -1, 1, hd)
        kv.keys = torch.cat([kv.keys, heads[:, layer.q_heads:layer.qk_heads]], dim=-2)
        kv.values = torch.cat([kv.values, heads[:, layer.qk_heads:]], dim=-2)
        self.lib.layer_back(self.x.data_ptr(), b, self.width, y.data_ptr(), width, layer.q_heads,
                            layer.qk_heads - layer.q_heads, hd, kv.keys.data_ptr(), kv.values.data_ptr(),
                            kv.keys.shape[2], None if self.mask is None else self.mask.data_ptr(), layer.scaling,
                            *o, norm2, eps2, *gate_up, inter, *down, self.threads)
        return self.x.view(self.shape)


def _plain_dynamic(cache) -> bool:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return type(cache) is DynamicCache and bool(cache.layers) and all(type(c) is DynamicLayer for c in cache.layers)


_HARMLESS = {"input_ids", "attention_mask", "past_key_values", "use_cache", "position_ids", "cache_position",
             "logits_to_keep", "return_dict"}


def install(model, step: DecodeStep) -> None:
    """Route the decode steps of transformers' `generate` on `model` through `step`: a forward call with one new
    token per row on a plain dynamic cache and a 2-D mask, asking for nothing else, gets `step`'s logits; every
    other call (prefill, training, extra outputs) goes to the model's own forward. `uninstall` undoes it."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = base.forward

    def forward(*args, **kwargs):
        ids, cache, mask = kwargs.get("input_ids"), kwargs.get("past_key_values"), kwargs.get("attention_mask")
        if (not args and ids is not None and ids.dim() == 2 and ids.shape[1] == 1
                and kwargs.get("use_cache") is not False and _plain_dynamic(cache) and not torch.is_grad_enabled()
                and all(k in _HARMLESS or v is None or v is False for k, v in kwargs.items())):
            seen, rows = cache.get_seq_length(), ids.shape[0]
            if mask is None:
                mask = torch.ones(rows, seen + 1, dtype=torch.long, device=ids.device)
            if seen > 0 and mask.dim() == 2 and mask.shape[1] == seen + 1:
                positions = kwargs.get("position_ids")
                if positions is None:  # as transformers derives them: the slot index, padding included
                    at = kwargs.get("cache_position")
                    positions = (at.view(1, 1) if at is not None else
                                 torch.tensor([[seen]], device=ids.device)).expand(rows, 1)
                logits = step(ids, mask, positions, cache)
                return CausalLMOutputWithPast(logits=logits[:, None, :], past_key_values=cache)
        return original(*args, **kwargs)

    # transformers' generate reads the forward's signature to choose its inputs (position ids from the mask, the
    # mask dropped when nothing is padded): the wrapper shows the original's, so generate passes what it always does.
    forward.__signature__ = inspect.signature(original)
    forward.chattune_original = original
    base.forward = forward


def uninstall(model) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = getattr(base.forward, "chattune_original", None)
    if original is not None:
        base.forward = original


@torch.inference_mode()
def _greedy_scores(model, prompts, pad_id: int, steps: int):
    ids = torch.tensor([[pad_id] * (max(map(len, prompts)) - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (ids.shape[1] - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
                         output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores).float()


def enable_for_generate(model, pad_id: int, log=print) -> bool:
    """`chattune chat`: transformers' `generate` decodes through chattune's step where that step drives this model
    and gives the same greedy tokens and scores (to 1e-3) on two left-padded probe prompts; says which."""
    why = why_not(model)
    if why is None:
        probe, step = [[5, 9, 13, 17, 21, 25, 29], [7, 11]], DecodeStep(model)
        try:
            want = _greedy_scores(model, probe, pad_id, 4)
            install(model, step)
            got = _greedy_scores(model, probe, pad_id, 4)
            if not (torch.equal(got[0], want[0]) and torch.allclose(got[1], want[1], atol=1e-3, rtol=1e-3)):
                why = "its logits differ from transformers' on this model"
        except Exception as e:  # noqa: BLE001 - any model the step cannot drive decodes through transformers
            why = f"{type(e).__name__}: {e}"
        if why:
            uninstall(model)
    if why:
        log(f"decode step: transformers' forward ({why})")
        return False
    log("decode step: chattune's own (checked against transformers' on this model; --decode-step transformers: "
        "the model's forward)")
    return True
