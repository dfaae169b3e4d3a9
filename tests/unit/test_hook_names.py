"""The exact, ordered hook names of a small model (2 vision blocks used, 2 language blocks)."""

from tiny import tiny_llava

from mmlens import HookedMultimodalTransformer

ATTN = ["attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_mask", "attn.hook_attn_scores",
        "attn.hook_pattern", "attn.hook_z"]
ATTN_ROTARY = ["attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
               "attn.hook_mask", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z"]
VISION_BLOCK = (["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized"] + ATTN +
                ["hook_attn_out", "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized",
                 "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post"])
LANGUAGE_BLOCK = (["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized"] + ATTN_ROTARY +
                  ["hook_attn_out", "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized",
                   "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out",
                   "hook_resid_post"])

EXPECTED = (
    ["vision.embed.hook_patch_embed", "vision.embed.hook_pos_embed", "vision.hook_embed",
     "vision.ln_pre.hook_scale", "vision.ln_pre.hook_normalized"]
    + [f"vision.blocks.0.{n}" for n in VISION_BLOCK]
    + [f"vision.blocks.1.{n}" for n in VISION_BLOCK]
    + ["projector.hook_in", "projector.hook_pre", "projector.hook_post", "projector.hook_out",
       "hook_token_embed", "hook_embed"]
    + [f"blocks.0.{n}" for n in LANGUAGE_BLOCK]
    + [f"blocks.1.{n}" for n in LANGUAGE_BLOCK]
    + ["ln_final.hook_scale", "ln_final.hook_normalized"]
)


def test_exact_ordered_hook_names():
    # Three vision layers with features from the penultimate: the last block is never built.
    model = HookedMultimodalTransformer.from_hf_model(tiny_llava(vision_layers=3, text_layers=2))
    assert list(model.hook_dict) == EXPECTED
    assert len(EXPECTED) == 5 + 2 * 18 + 6 + 2 * 21 + 2
