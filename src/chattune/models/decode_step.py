"""chattune's own decode step for decoders laid out as Llama: one new token per row, the same maths as
transformers' forward without most of its per-layer Python.

Why by hand: on a CPU a small model's decode step is dominated by per-call overhead, not arithmetic. transformers'
forward runs some 50 tensor ops and module calls per layer for one token (mask building, cache bookkeeping,
keyword plumbing, hooks); on the bundled model that is about half of a 28 ms step even with the packed kernels
(models/blockweights.py). This step calls the model's own modules for what carries choices — the embeddings, the
rotary embedding (so every RoPE scaling variant is the model's own), the MLP's activation, and every projection
it cannot read directly — and does the rest (RMSNorm as transformers computes it, the rotation, the cache append,
attention through torch's SDPA) in a few plain ops. Packed projections (plain, or under a plain LoRA adapter) are
read directly: q/k/v and gate/up (models/layers.py: the projections that read one input) as one kernel call each,
the adapters folded in (`_FusedProjection`). A layer whose seven projections are all packed runs as two C calls
(`layer_front`, `layer_back` in models/blockweights.py) around the cache append, the rest of its maths included;
when every layer is such a layer, the whole step is one C call (`_WholeStep`). The cache grows in place (`append`).

It is used only for what it was checked on: models whose config says Llama, Mistral (without a sliding window) or
Qwen2 (without one in use), plain or with peft LoRA, whose layers have the Llama shape; and only after a start-up
check on the loaded model has found its results equal to transformers' own: serve's engine calls it directly
(`engine.step_matches_transformers`: logits of two prompts of different lengths, padded, over several steps),
`chat` routes transformers' `generate` through it (`enable_for_generate`: greedy tokens and scores), both compared
by models/checks.py (`same_logits`: the same argmax, differences within the rounding of the model's dtype). Anything
else decodes through transformers.
"""

from __future__ import annotations

import ctypes
import inspect

import torch
import torch.nn.functional as F

from chattune.models.checks import model_dtype, same_logits
from chattune.models.layers import ATTENTION_INPUT, MLP_INPUT, decoder_layers

MODEL_TYPES = ("llama", "mistral", "qwen2")
# The start-up checks' two prompts (token ids valid in any vocabulary of 30+): different lengths, so the shorter
# one is left-padded when they run together.
PROBE = ([5, 9, 13, 17, 21, 25, 29], [7, 11])
_ATTENTION = ATTENTION_INPUT + ("o_proj",)  # q/k/v read one input, o its own
_MLP = MLP_INPUT + ("down_proj", "act_fn")  # gate/up read one input, down its own


def base_model(model):
    """The transformers model under a peft wrapper (the model itself when there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _hooked(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _unwrap(module):
    """(packed base nn.Linear, [(A [r, K], B [O, r] times its scaling) per active adapter]) for a plain packed
    nn.Linear, or for peft's LoRA Linear over one (plain LoRA in eval mode: no DoRA or other variant, no bias on
    A or B, fp32); None for anything else, and for modules with hooks (their calls must stay calls)."""
    def plain(m):
        return type(m) is torch.nn.Linear and hasattr(m, "_chattune_packed") and not _hooked(m)

    if plain(module):
        return module, []
    base = getattr(module, "base_layer", None)
    if type(module).__name__ != "Linear" or not type(module).__module__.startswith("peft.tuners.lora") \
            or not plain(base) or _hooked(module) or module.training or module.merged:
        return None
    if module.disable_adapters:
        return base, []
    adapters = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        down, up = module.lora_A[name], module.lora_B[name]
        if name in getattr(module, "lora_variant", {}) or type(down) is not torch.nn.Linear \
                or type(up) is not torch.nn.Linear or down.bias is not None or up.bias is not None \
                or down.weight.dtype != torch.float32 or up.weight.dtype != torch.float32:
            return None
        adapters.append((down.weight.detach(), up.weight.detach() * module.scaling[name]))
    return base, adapters


class _FusedProjection:
    """Projections that read the same input (q/k/v, gate/up), or one alone, as one packed matmul: their blocks
    stacked (the layers' own packed weights become views of the stacked rows, so nothing is held twice), their
    biases concatenated, and their LoRA adapters as one down-projection `lora_a` [R, K] and one up-projection
    `lora_bt` [R, O] (transposed, block-diagonal, scalings folded in). A copy, like the packed blocks: adapters
    switched or changed later are not seen."""

    def __init__(self, parts):
        from chattune.models.blockweights import BlockWeight, Proj

        bases = [base for base, _ in parts]
        if len(bases) == 1:
            self.packed = bases[0]._chattune_packed
        else:
            packs = [b._chattune_packed for b in bases]
            self.packed, start = BlockWeight(packs[0].kind, torch.cat([p.data for p in packs])), 0
            for b in bases:
                b._chattune_packed = BlockWeight(self.packed.kind, self.packed.data[start:start + b.out_features])
                start += b.out_features
        self.out = sum(b.out_features for b in bases)
        self.bias = None if all(b.bias is None for b in bases) else torch.cat(
            [b.bias.detach() if b.bias is not None else b.weight.new_zeros(b.out_features) for b in bases])
        adapters = [(i, a, bt) for i, (_, pairs) in enumerate(parts) for a, bt in pairs]
        self.lora_a = self.lora_bt = None
        if adapters:
            self.lora_a = torch.cat([a for _, a, _ in adapters]).contiguous()
            self.lora_bt = torch.zeros(self.lora_a.shape[0], self.out)
            offsets = [sum(b.out_features for b in bases[:i]) for i in range(len(bases) + 1)]
            row = 0
            for i, a, b in adapters:
                self.lora_bt[row:row + a.shape[0], offsets[i]:offsets[i + 1]] = b.t()
                row += a.shape[0]
        address = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        self.proj = Proj(4 if self.packed.kind == "q4" else 8, self.packed.ptr, address(self.bias),
                         address(self.lora_a), address(self.lora_bt), 0 if self.lora_a is None else len(self.lora_a))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from chattune.models.blockweights import block_linear

        y = block_linear(x, self.packed, self.out, self.bias)
        if self.lora_a is not None:
            y = y + (x @ self.lora_a.t()) @ self.lora_bt
        return y


def _fused(modules) -> _FusedProjection | None:
    """One _FusedProjection for `modules` where each is packed (plain or under LoRA) with blocks of one kind and
    width."""
    parts = [_unwrap(m) for m in modules]
    if any(p is None for p in parts):
        return None
    packs = [base._chattune_packed for base, _ in parts]
    if len({p.kind for p in packs}) != 1 or len({p.data.shape[1] for p in packs}) != 1:
        return None
    return _FusedProjection(parts)


def _projection(module):
    """The callable for one projection: its packed group (the kernel directly, skipping the module call), or the
    module itself (fp32 Linear, quantised layer, anything with hooks)."""
    return _fused([module]) or module


def _is_silu(act) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


class _Layer:
    __slots__ = ("q", "k", "v", "o", "gate", "up", "down", "act", "norm1", "eps1", "norm2", "eps2", "head_dim",
                 "scaling", "qkv", "gate_up", "q_heads", "qk_heads", "native")

    def __init__(self, layer):
        a, mlp = layer.self_attn, layer.mlp
        self.qkv = _fused([getattr(a, n) for n in ATTENTION_INPUT])
        self.gate_up = _fused([getattr(mlp, n) for n in MLP_INPUT])
        self.q_heads = a.q_proj.out_features // a.head_dim
        self.qk_heads = self.q_heads + a.k_proj.out_features // a.head_dim
        # (each projection on its own only where it is not in a fused group)
        self.q, self.k, self.v = (None,) * 3 if self.qkv else (_projection(getattr(a, n)) for n in ATTENTION_INPUT)
        self.gate, self.up = (None,) * 2 if self.gate_up else (_projection(getattr(mlp, n)) for n in MLP_INPUT)
        self.o, self.down = _projection(a.o_proj), _projection(mlp.down_proj)
        self.act = mlp.act_fn
        self.norm1, self.eps1 = layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon
        self.norm2, self.eps2 = layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon
        self.head_dim, self.scaling = a.head_dim, a.scaling
        # The C layer (models/blockweights.py: layer_front, layer_back): all seven projections packed (LoRA or not),
        # SiLU, fp32; else None and the layer runs in torch ops.
        self.native = all(isinstance(g, _FusedProjection) for g in (self.qkv, self.gate_up, self.o, self.down)) \
            and _is_silu(self.act) and self.norm1.dtype == torch.float32 and self.head_dim % 2 == 0


def why_not(model) -> str | None:
    """Why this step cannot drive `model` (None: it can, subject to the start-up checks: serve's
    `engine.step_matches_transformers`, chat's `enable_for_generate`)."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return "a P-tuning v2 prefix"
    base = base_model(model)
    config = getattr(base, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in MODEL_TYPES:
        return f"model type {kind!r} (chattune's step knows {', '.join(MODEL_TYPES)})"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    inner, found = getattr(base, "model", None), decoder_layers(base)
    if found is None or not isinstance(inner, torch.nn.Module) \
            or not all(hasattr(inner, n) for n in ("embed_tokens", "norm", "rotary_emb")) \
            or not any(child is found[1] for child in inner.children()) or not hasattr(base, "lm_head"):
        return f"{type(base).__name__} is not laid out as LlamaForCausalLM"
    for layer in found[1]:
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
        base = base_model(model)
        inner = base.model
        self.embed, self.rotary = inner.embed_tokens, inner.rotary_emb
        self.layers = [_Layer(layer) for layer in decoder_layers(base)[1]]  # inner's own list (why_not)
        self.norm, self.eps = inner.norm.weight, inner.norm.variance_epsilon
        self.head = _projection(base.lm_head)
        self.whole = _WholeStep(self) if all(layer.native for layer in self.layers) and self.layers else None

    @classmethod
    def of(cls, model) -> "DecodeStep | None":
        """The step for `model`, or None where `why_not` has a reason."""
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
        if self.whole is not None:
            return self.whole(x, cos, sin, None if attend is None else mask, cache)
        half = self.layers[0].head_dim // 2

        def rotate(t):
            return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin

        native = None
        for layer, kv in zip(self.layers, cache.layers):
            if layer.native:
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
            append(kv, k, v)
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


class _WholeStep:
    """Every decoder layer (and the final norm and head, where the head is packed) in one C call,
    `decode_layers`, for models whose layers are all C layers: each layer's new keys and values go straight into
    its cache's storage (`_room`). Why: two C calls per layer meant 60 returns to Python a step, each taking the GIL
    back from whatever else holds it (a server's event loop), and the argument building around them; measured on
    the bundled model in `chattune serve`, that was a quarter of a single stream's time."""

    def __init__(self, step: "DecodeStep"):
        from chattune.models.blockweights import Layer, _library

        self.lib = _library()
        self.specs = (Layer * len(step.layers))()
        for spec, layer in zip(self.specs, step.layers):
            spec.norm1, spec.eps1, spec.qkv, spec.qkv_out = (layer.norm1.data_ptr(), layer.eps1, layer.qkv.proj,
                                                              layer.qkv.out)
            spec.q_heads, spec.kv_heads, spec.hd = layer.q_heads, layer.qk_heads - layer.q_heads, layer.head_dim
            spec.scale, spec.o, spec.norm2, spec.eps2 = layer.scaling, layer.o.proj, layer.norm2.data_ptr(), layer.eps2
            spec.gate_up, spec.inter, spec.down = layer.gate_up.proj, layer.gate_up.out // 2, layer.down.proj
        head = step.head
        self.head = head if isinstance(head, _FusedProjection) and head.bias is None else None
        self.step = step  # (its layers hold the tensors whose addresses the specs carry)

    def __call__(self, x, cos, sin, mask, cache) -> torch.Tensor:
        b, width = x.shape[0], x.shape[-1]
        kvs = cache.layers
        t = kvs[0].keys.shape[2]
        for spec, kv in zip(self.specs, kvs):
            if kv.keys.shape[2] != t:
                raise ValueError(f"cache layers of different lengths ({kv.keys.shape[2]} and {t})")
            keys, values = _room(kv)  # (set every step: new storage may reuse a freed one's address)
            spec.keys, spec.values, spec.cap = keys.data_ptr(), values.data_ptr(), keys.shape[2]
        h = x.reshape(b, width).contiguous()
        cos, sin = cos.reshape(b, -1).contiguous(), sin.reshape(b, -1).contiguous()
        mask = None if mask is None else mask.to(torch.int64).contiguous()
        head, step = self.head, self.step
        logits = torch.empty(b, head.out) if head is not None else None
        self.lib.decode_layers(len(self.specs), ctypes.addressof(self.specs), h.data_ptr(), b, width,
                               cos.data_ptr(), sin.data_ptr(), t, None if mask is None else mask.data_ptr(),
                               step.norm.data_ptr(), step.eps, None if head is None else ctypes.addressof(head.proj),
                               0 if head is None else head.out, None if logits is None else logits.data_ptr(),
                               torch.get_num_threads())
        for kv in kvs:
            keys, values = kv._chattune_room
            kv.keys, kv.values = keys[:, :, :t + 1], values[:, :, :t + 1]
        if logits is not None:
            return logits
        return step.head(step._rms(h.view(b, 1, width), step.norm, step.eps))[:, -1, :].float()


class _NativeStep:
    """The C layer's per-step arguments: its own x [B, H] (updated in place by each C layer), cos/sin [B, hd], the
    mask [B, T] as int64 (NULL when no slot is padded), the thread count."""

    def __init__(self, x, cos, sin, mask, unpadded: bool):
        from chattune.models.blockweights import _library

        self.lib = _library()
        self.b, self.width = x.shape[0], x.shape[-1]
        self.x, self.shape = torch.empty(self.b, self.width), x.shape
        self.cos, self.sin = cos.reshape(self.b, -1).contiguous(), sin.reshape(self.b, -1).contiguous()
        self.mask = None if unpadded else mask.to(torch.int64).contiguous()
        self.threads = torch.get_num_threads()

    def layer(self, layer, kv, x: torch.Tensor) -> torch.Tensor:
        """Layer `layer` on the hidden states `x` (the previous layer's output); returns the new ones."""
        if x.data_ptr() != self.x.data_ptr():  # the embeddings, or the output of a layer that ran in torch
            self.x.copy_(x.reshape(self.b, self.width))
        b, hd, qkv = self.b, layer.head_dim, layer.qkv
        y = torch.empty(b, qkv.out)
        ref = ctypes.addressof
        self.lib.layer_front(self.x.data_ptr(), b, self.width, layer.norm1.data_ptr(), layer.eps1, ref(qkv.proj),
                             qkv.out, self.cos.data_ptr(), self.sin.data_ptr(), hd, layer.qk_heads, y.data_ptr(),
                             self.threads)
        heads = y.view(b, -1, 1, hd)
        cap = append(kv, heads[:, layer.q_heads:layer.qk_heads], heads[:, layer.qk_heads:])
        self.lib.layer_back(self.x.data_ptr(), b, self.width, y.data_ptr(), qkv.out, layer.q_heads,
                            layer.qk_heads - layer.q_heads, hd, kv.keys.data_ptr(), kv.values.data_ptr(),
                            kv.keys.shape[2], cap, None if self.mask is None else self.mask.data_ptr(), layer.scaling,
                            ref(layer.o.proj), layer.norm2.data_ptr(), layer.eps2, ref(layer.gate_up.proj),
                            layer.gate_up.out // 2, ref(layer.down.proj), self.threads)
        return self.x.view(self.shape)


ROOM = 128  # slots a layer's cache grows by at a time (then by half its length): one copy per 128+ tokens


def _room(kv) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's key and value storage [B, kv_heads, cap, hd] with a free slot after its T (see `append`)."""
    keys, values = kv.keys, kv.values
    b, heads, t, hd = keys.shape
    room = getattr(kv, "_chattune_room", None)
    if (room is None or room[0].shape[0] != b or room[0].shape[2] <= t or keys.data_ptr() != room[0].data_ptr()
            or values.data_ptr() != room[1].data_ptr() or keys.stride() != room[0].stride()):
        cap = t + max(ROOM, t // 2)
        room = (keys.new_empty(b, heads, cap, hd), values.new_empty(b, heads, cap, hd))
        room[0][:, :, :t].copy_(keys)
        room[1][:, :, :t].copy_(values)
        kv._chattune_room = room
    return room


def append(kv, k: torch.Tensor, v: torch.Tensor) -> int:
    """Append one step's keys and values [B, kv_heads, 1, hd] to a cache layer; returns the slot stride of its
    storage (its `cap`). Why: `torch.cat` at every step copies the whole cache of every layer (at 8 rows and a few
    hundred tokens, megabytes a step). Here a layer keeps its keys and values in storage [B, kv_heads, cap, hd]
    with room to grow, and `kv.keys`/`kv.values` are views of its first T slots, so a step writes only the new
    slot. Whatever replaces the views (the engine's merge and keep, transformers' own cat) leaves plain tensors,
    which the next append copies once into new storage."""
    keys, values = _room(kv)
    t = kv.keys.shape[2]
    keys[:, :, t:t + 1].copy_(k)
    values[:, :, t:t + 1].copy_(v)
    kv.keys, kv.values = keys[:, :, :t + 1], values[:, :, :t + 1]
    return keys.shape[2]


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

    base = base_model(model)
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
    base = base_model(model)
    original = getattr(base.forward, "chattune_original", None)
    if original is not None:
        base.forward = original


@torch.inference_mode()
def _greedy_scores(model, prompts, pad_id: int, steps: int):
    from chattune.evaluate.generate import left_pad

    ids, mask = left_pad(prompts, pad_id, next(model.parameters()).device)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
                         output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores).float()


def install_for_generate(model, pad_id: int) -> str | None:
    """Route transformers' `generate` on `model` through chattune's step where that step drives this model and
    gives the same greedy tokens and scores (to 1e-3) on two left-padded probe prompts. None when it is installed,
    else why not (and the model's forward is left as it was)."""
    why = why_not(model)
    if why is not None:
        return why
    step = DecodeStep(model)
    try:
        want = _greedy_scores(model, list(PROBE), pad_id, 4)
        install(model, step)
        got = _greedy_scores(model, list(PROBE), pad_id, 4)
        if not (torch.equal(got[0], want[0]) and same_logits(got[1], want[1], model_dtype(model))):
            why = "its logits differ from transformers' on this model"
    except Exception as e:  # noqa: BLE001 - any model the step cannot drive decodes through transformers
        why = f"{type(e).__name__}: {e}"
    if why:
        uninstall(model)
    return why


def enable_for_generate(model, pad_id: int, log=print) -> bool:
    """`chattune chat`, `eval`: `install_for_generate`, saying which decode step is used."""
    why = install_for_generate(model, pad_id)
    if why:
        log(f"decode step: transformers' forward ({why})")
        return False
    log("decode step: chattune's own (checked against transformers' on this model; --decode-step transformers: "
        "the model's forward)")
    return True
