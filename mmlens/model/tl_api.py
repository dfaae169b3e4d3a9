"""TransformerLens's daily vocabulary on the hooked model: weight stacks, factored circuits,
tokens and token strings, per-head results, accumulated biases, the language-model loss.

Names, shapes and meanings follow ``transformer_lens.HookedTransformer`` (language model
only; the vision tower keeps its weights on ``model.vision.blocks[l]``):

    model.W_Q, model.W_K, model.W_V   [n_layers, n_heads, d_model, d_head]  (K/V heads repeated
                                      to n_heads for grouped-query attention, as in TL)
    model.W_O                          [n_layers, n_heads, d_head, d_model]
    model.W_in, model.W_gate           [n_layers, d_model, d_mlp]
    model.W_out                        [n_layers, d_mlp, d_model]
    model.W_E, model.W_U               [d_vocab, d_model], [d_model, d_vocab]
    model.QK, model.OV                 FactoredMatrix [n_layers, n_heads, d_model, d_model]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import FactoredMatrix

from mmlens.inputs.batch import decode_each

FOLDING_KWARGS = {
    "fold_ln": "the RMSNorm weights stay in ln1 / ln2 / ln_final (hook_scale and w), so every "
               "hook sees Hugging Face's activations; fold them by hand where you need folded "
               "directions (tokens_to_residual_directions folds ln_final's weight)",
    "center_writing_weights": "RMSNorm does not subtract the mean, so centering the weights "
                              "that write to the residual stream would change the outputs",
    "center_unembed": "RMSNorm does not subtract the mean, so centering the unembedding "
                      "would change the logits",
    "fold_value_biases": "Llama's attention has no value biases to fold",
    "refactor_factored_attn_matrices": "the weights are kept as the checkpoint has them",
}
"""TransformerLens's weight-processing options, all refused: the weights are loaded unfolded."""

ACCEPTED_KWARGS = ("dtype", "device", "revision", "cache_dir", "local_files_only", "token",
                   "force_download", "subfolder")
"""Keyword arguments ``from_pretrained`` accepts (the rest go to Hugging Face's loader)."""


def check_pretrained_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse weight-folding options (with the reason) and any unknown keyword argument."""
    for name in kwargs:
        if name in FOLDING_KWARGS:
            raise TypeError(f"from_pretrained does not support {name}=: weights are loaded "
                            f"unfolded, exactly as the checkpoint has them; {FOLDING_KWARGS[name]}")
        if name not in ACCEPTED_KWARGS:
            raise TypeError(f"from_pretrained got an unexpected keyword argument {name!r}: it "
                            f"accepts {', '.join(ACCEPTED_KWARGS)}")


def language_model_loss(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None, image_token_id: int,
    per_token: bool = False,
) -> Float[Tensor, ""] | Float[Tensor, "batch pos_minus_1"]:
    """Next-token cross-entropy over text: position ``t`` predicts token ``t + 1``.

    A prediction counts when its target is a text token (not the image token) and neither
    position is padding. Returns the mean over counted predictions, or with ``per_token`` the
    loss ``[batch, pos - 1]`` with 0 where a prediction does not count.
    """
    log_probs = logits[:, :-1].float().log_softmax(-1)
    targets = tokens[:, 1:].to(log_probs.device)
    nll = -log_probs.gather(-1, targets[..., None])[..., 0]
    counted = targets != image_token_id
    if attention_mask is not None:
        mask = attention_mask.to(log_probs.device).bool()
        counted &= mask[:, 1:] & mask[:, :-1]
    if per_token:
        return nll * counted
    if not bool(counted.any()):
        raise ValueError("the loss has no text token to predict: every target is an image token "
                         "or padding")
    return nll[counted].mean()


class TransformerLensAPI:
    """Mixed into ``HookedMultimodalTransformer``: TransformerLens's names on the language model."""

    cfg: Any
    blocks: Any
    embed: Any
    vision: Any
    unembed: Any
    ln_final: Any

    # ----------------------------------------------------------------- cfg.dtype, cfg.device
    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # .to(), .cuda(), .half()... all pass here: keep cfg.dtype / cfg.device true
        result = super()._apply(fn, *args, **kwargs)
        self.sync_cfg_placement()
        return result

    def sync_cfg_placement(self) -> None:
        """Set ``cfg.dtype`` and ``cfg.device`` from the token embedding's weight."""
        embed = self._modules.get("embed")
        if embed is not None:  # None while __init__ is still building the model
            self.cfg.dtype, self.cfg.device = embed.W_E.dtype, embed.W_E.device

    # ----------------------------------------------------------------- weight stacks
    def _stack(self, get: Any) -> Tensor:
        return torch.stack([get(block) for block in self.blocks])

    def _kv_heads(self, weights: Tensor) -> Tensor:
        return weights.repeat_interleave(self.cfg.n_heads // self.cfg.n_key_value_heads, dim=0)

    @property
    def W_Q(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: b.attn.W_Q)

    @property
    def W_K(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: self._kv_heads(b.attn.W_K))

    @property
    def W_V(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: self._kv_heads(b.attn.W_V))

    @property
    def W_O(self) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
        return self._stack(lambda b: b.attn.W_O)

    @property
    def b_O(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack(lambda b: b.attn.b_O)

    @property
    def W_in(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stack(lambda b: b.mlp.W_in)

    @property
    def W_gate(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stack(lambda b: b.mlp.W_gate)

    @property
    def W_out(self) -> Float[Tensor, "n_layers d_mlp d_model"]:
        return self._stack(lambda b: b.mlp.W_out)

    @property
    def b_out(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack(lambda b: b.mlp.b_out)

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q W_K^T`` per layer and head: ``[n_layers, n_heads, d_model, d_model]``."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V W_O`` per layer and head: ``[n_layers, n_heads, d_model, d_model]``."""
        return FactoredMatrix(self.W_V, self.W_O)

    def accumulated_bias(self, layer: int, mlp_input: bool = False,
                         include_mlp_biases: bool = True) -> Float[Tensor, " d_model"]:
        """Sum of the attention (and MLP) output biases written before ``layer``'s attention
        (``mlp_input``: before its MLP, i.e. including its attention bias)."""
        if not 0 <= layer <= self.cfg.n_layers or (mlp_input and layer == self.cfg.n_layers):
            raise ValueError(f"layer {layer} is outside 0..{self.cfg.n_layers} (mlp_input needs a "
                             f"layer below {self.cfg.n_layers})")
        total = self.embed.W_E.new_zeros(self.cfg.d_model)
        for block in self.blocks[:layer]:
            total = total + block.attn.b_O
            if include_mlp_biases:
                total = total + block.mlp.b_out
        if mlp_input:
            total = total + self.blocks[layer].attn.b_O
        return total

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Cache per-head outputs ``blocks.{l}.attn.hook_result`` ``[batch, pos, n_heads,
        d_model]`` (and ``vision.blocks.{l}.attn.hook_result``); off by default, as in
        TransformerLens, because it costs ``n_heads`` times the attention output."""
        for block in [*self.blocks, *self.vision.blocks]:
            block.attn.set_use_attn_result(use_attn_result)
        self.cfg.use_attn_result = bool(use_attn_result)
        self.setup()  # refresh hook_dict: hook_result exists only while it is computed

    # ----------------------------------------------------------------- tokens and strings
    def to_str_tokens(
        self, input: str | Sequence[str] | Tensor | Any, prepend_bos: bool = True
    ) -> list[str] | list[list[str]]:
        """Each token as a string: text (tokenized first), ``[pos]`` / ``[1, pos]`` token ids,
        a list of texts (one list each), or a ``MultimodalBatch`` (``batch.str_tokens``)."""
        from mmlens.inputs.batch import MultimodalBatch

        if isinstance(input, MultimodalBatch):
            tokenizer = input.tokenizer or self._require_tokenizer()
            return [decode_each(tokenizer, row) for row in input.input_ids]
        if isinstance(input, list | tuple) and input and all(isinstance(t, str) for t in input):
            return [self.to_str_tokens(text, prepend_bos) for text in input]
        tokens = self.to_tokens(input, prepend_bos=prepend_bos) if isinstance(input, str) else input
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"to_str_tokens takes one sequence, got a batch of "
                                 f"{tokens.shape[0]}: pass one row, or a MultimodalBatch")
            tokens = tokens[0]
        return decode_each(self._require_tokenizer(), tokens)

    def tokens_to_residual_directions(
        self, tokens: str | int | Int[Tensor, ""] | Int[Tensor, " pos"] | Int[Tensor, "batch pos"],
    ) -> Float[Tensor, "... d_model"]:
        """Unembedding directions ``[..., d_model]`` (``[d_model]`` for one token, given as a
        string of one token, an id or a 0-d tensor), with ``ln_final``'s weight folded in so
        that ``(resid / ln_final.hook_scale) @ direction`` is the token's logit."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        return (self.unembed.W_U * self.ln_final.gain[:, None]).T[tokens]

    def get_token_position(
        self, single_token: str | int, input: str | Tensor | Any, mode: str = "first",
        prepend_bos: bool = True,
    ) -> int:
        """Where ``single_token`` (a string of one token, or its id) occurs in ``input`` (text,
        ``[pos]`` / ``[1, pos]`` ids, or a one-example ``MultimodalBatch``): its first or last
        position (``mode``)."""
        from mmlens.inputs.batch import MultimodalBatch

        if mode not in ("first", "last"):
            raise ValueError(f"mode={mode!r} is not known: use 'first' or 'last'")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(
            single_token)
        if isinstance(input, MultimodalBatch):
            if len(input) != 1:
                raise ValueError(f"get_token_position takes one example, got a batch of "
                                 f"{len(input)}: use batch.select(i)")
            input = input.input_ids
        tokens = self.to_tokens(input, prepend_bos=prepend_bos) if isinstance(input, str) else input
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"get_token_position takes one sequence, got a batch of "
                                 f"{tokens.shape[0]}")
            tokens = tokens[0]
        found = (tokens == token).nonzero()[:, 0]
        if len(found) == 0:
            raise ValueError(f"token {token} ({single_token!r}) does not occur in the input")
        return int(found[0] if mode == "first" else found[-1])

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", None)

    def to_tokens(self, text: str | list[str], prepend_bos: bool = True) -> Tensor:
        """Token ids ``[batch, pos]`` of text, with the tokenizer's BOS unless ``prepend_bos``
        is False."""
        tok = self._require_tokenizer()
        return tok(text, return_tensors="pt", padding=True,
                   add_special_tokens=prepend_bos)["input_ids"]

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        tok = self._require_tokenizer()
        if isinstance(tokens, Tensor) and tokens.ndim == 2:
            return tok.batch_decode(tokens)
        return tok.decode(tokens)

    def to_single_token(self, text: str) -> int:
        ids = self._require_tokenizer()(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens, not one: {ids}")
        return ids[0]

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: load it with from_pretrained or pass "
                             "processor= to from_hf_model")
        return self.tokenizer
