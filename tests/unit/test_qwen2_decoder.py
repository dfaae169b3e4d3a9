"""The decoder with Qwen2's q/k/v biases (and no output bias) matches HF's Qwen2 in float32."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM
from typecheck import unchecked

from mmlens.model.components import Embed, RMSNorm, RotaryEmbedding, Unembed
from mmlens.model.config import language_config_from_hf
from mmlens.model.language import LanguageStack, positions_from_mask
from mmlens.model.loading.convert import convert_language


class _Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed = Embed(cfg.d_vocab, cfg.d_model)
        self.blocks = LanguageStack.build_blocks(cfg)
        self.ln_final = RMSNorm(cfg.d_model, cfg.eps)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab)
        self.stack = LanguageStack(
            cfg, self.blocks, RotaryEmbedding(cfg.rope_inv_freq, cfg.rope_attention_scaling))


def _tiny_qwen2() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                         max_position_embeddings=128, rope_parameters={"rope_type": "default",
                                                                       "rope_theta": 1e6})
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises biases to zero; random ones make the test bite
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def test_qwen2_decoder_matches_hf_on_a_left_padded_batch():
    hf = _tiny_qwen2()
    cfg = language_config_from_hf(hf.config)
    assert cfg.qkv_bias and not cfg.o_bias
    ours = _Decoder(cfg)
    with unchecked():  # only the text config matters here; no full MultimodalConfig needed
        state = convert_language(hf.state_dict(), SimpleNamespace(text=cfg))
    ours.load_state_dict(state, strict=True)
    assert ours.blocks[0].attn.o_bias is None and ours.blocks[0].attn.q_bias is not None
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        resid = ours.stack(ours.embed(ids), attention_mask=mask,
                           position_ids=positions_from_mask(mask))
        logits = ours.unembed(ours.ln_final(resid))
    real = mask.bool()
    assert (logits - out.logits)[real].abs().max() <= 1e-4
    # the last hidden state HF returns is after the final norm
    assert (ours.ln_final(resid) - out.hidden_states[-1])[real].abs().max() <= 1e-5


def test_sliding_window_qwen2_is_refused():
    config = Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=32, use_sliding_window=True)
    with pytest.raises(ValueError, match="sliding-window attention"):
        language_config_from_hf(config)
