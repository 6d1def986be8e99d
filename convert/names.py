"""The one table of tensor names: Hugging Face DeepSeek-V3 names <-> llama.cpp GGUF (deepseek2) names.

ktpack's canonical names are the GGUF ones (the planner's rules and the runtime use them). Routed
experts are the exception to 1:1: HF `mlp.experts.E.{gate,up,down}_proj.weight` are stacked into one
GGUF tensor `ffn_{gate,up,down}_exps.weight` of shape [E, rows, cols].
"""

from __future__ import annotations

# HF name inside `model.layers.N.` -> GGUF name inside `blk.N.` (as llama.cpp's convert_hf_to_gguf.py maps them)
HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}
# names outside the layers
GLOBAL_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
GGUF_TO_HF = {v: k for k, v in HF_TO_GGUF.items()}
GLOBAL_GGUF_TO_HF = {v: k for k, v in GLOBAL_HF_TO_GGUF.items()}
