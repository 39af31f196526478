"""Transformers families beyond the test zoo, tried as a new user would.

Tiny models from configs (random weights), eager and SDPA where transformers offers both; each is
called once under the zoo's runtime probe (which records the module and head count of every
attention it computes) and once through ``attnopt.find_sites``; an entry counts as found when both
agree site for site. KV heads and causality are printed for reading. Not part of the test suite:
these families are what a user brings next, so this is run by hand after matcher changes.

    python benchmarks/beyond_zoo.py      # writes benchmarks/results/beyond_zoo.{json,md}
"""

import datetime
import json
import pathlib
import sys
import warnings

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.simplefilter("ignore")
import transformers  # noqa: E402

import attnopt  # noqa: E402
from tests.patterns.test_zoo import probe_sites  # noqa: E402

LM = dict(pad_token_id=0, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          max_position_embeddings=128)
GQA = dict(LM, num_key_value_heads=2)
ENC = dict(pad_token_id=0, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=128)
S2S = dict(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
           decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128,
           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)
FAMS = [
    ("olmo", "OlmoConfig", "OlmoForCausalLM", GQA, "lm"),
    ("olmo2", "Olmo2Config", "Olmo2ForCausalLM", GQA, "lm"),
    ("granite", "GraniteConfig", "GraniteForCausalLM", GQA, "lm"),
    ("cohere", "CohereConfig", "CohereForCausalLM", GQA, "lm"),
    ("mixtral", "MixtralConfig", "MixtralForCausalLM", dict(GQA, num_local_experts=2, num_experts_per_tok=1), "lm"),
    ("qwen2-moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(GQA, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, shared_expert_intermediate_size=32), "lm"),
    ("persimmon", "PersimmonConfig", "PersimmonForCausalLM", LM, "lm"),
    ("nemotron", "NemotronConfig", "NemotronForCausalLM", GQA, "lm"),
    ("glm", "GlmConfig", "GlmForCausalLM", dict(GQA, head_dim=16), "lm"),
    ("helium", "HeliumConfig", "HeliumForCausalLM", dict(GQA, head_dim=16), "lm"),
    ("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", GQA, "lm"),
    ("granitemoe", "GraniteMoeConfig", "GraniteMoeForCausalLM", dict(GQA, num_local_experts=2, num_experts_per_tok=1), "lm"),
    ("xlm-roberta", "XLMRobertaConfig", "XLMRobertaModel", ENC, "enc"),
    ("camembert", "CamembertConfig", "CamembertModel", ENC, "enc"),
    ("mpnet", "MPNetConfig", "MPNetModel", ENC, "enc"),
    ("roformer", "RoFormerConfig", "RoFormerModel", dict(ENC, embedding_size=64), "enc"),
    ("megatron-bert", "MegatronBertConfig", "MegatronBertModel", ENC, "enc"),
    ("data2vec-text", "Data2VecTextConfig", "Data2VecTextModel", ENC, "enc"),
    ("modernbert", "ModernBertConfig", "ModernBertModel", dict(ENC, global_attn_every_n_layers=1), "enc"),
    ("mbart", "MBartConfig", "MBartModel", S2S, "s2s"),
    ("marian", "MarianConfig", "MarianModel", S2S, "s2s"),
    ("pegasus", "PegasusConfig", "PegasusModel", S2S, "s2s"),
    ("m2m100", "M2M100Config", "M2M100Model", S2S, "s2s"),
    ("blenderbot", "BlenderbotConfig", "BlenderbotModel", S2S, "s2s"),
]
N = 16
def inputs(kind):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, N), generator=g)
    if kind == "lm":
        return {"input_ids": ids, "use_cache": False}
    if kind == "enc":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids, "decoder_input_ids": ids[:, :8], "use_cache": False}

ok = total = 0
rows = []
for name, cfg_name, model_name, kw, kind in FAMS:
    for impl in ("eager", "sdpa"):
        tag = f"{name}-{impl}"
        try:
            cfg = getattr(transformers, cfg_name)(**kw)
            cfg._attn_implementation = impl
            model = getattr(transformers, model_name)(cfg).eval()
        except Exception as e:
            rows.append({"entry": tag, "status": "skipped", "detail": f"cannot build: {type(e).__name__}: {str(e)[:100]}"})
            print(f"SKIP {tag}: cannot build ({type(e).__name__}: {str(e)[:100]})")
            continue
        call = inputs(kind)
        try:
            probe = probe_sites(model, (), call)
        except Exception as e:
            rows.append({"entry": tag, "status": "skipped", "detail": f"probe failed: {type(e).__name__}"})
            continue
        total += 1
        try:
            with torch.no_grad():
                sites = attnopt.find_sites(model, **call)
        except Exception as e:
            rows.append({"entry": tag, "status": "missed", "detail": f"find_sites raised {type(e).__name__}: {str(e)[:150]}"})
            continue
        want = [(r["module_path"], r["num_heads"]) for r in probe]
        got = [(s.module_path, s.num_heads) for s in sites]
        shape = " ".join(f"{s.num_heads}/{s.num_kv_heads}{' causal' if s.causal else ''}" for s in sites)
        if want == got:
            ok += 1
            rows.append({"entry": tag, "status": "found", "detail": f"{len(sites)} sites: {shape}"})
        else:
            rows.append({"entry": tag, "status": "missed", "detail": f"probe {want} vs found {got}"})
        print(tag, rows[-1]["status"], rows[-1]["detail"])
date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")
meta = {"date": date, "torch": torch.__version__, "transformers": transformers.__version__, "found": ok, "tried": total}
out = ROOT / "benchmarks" / "results"
(out / "beyond_zoo.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
lines = [f"# Families beyond the zoo ({date}, torch {meta['torch']}, transformers {meta['transformers']})", "",
         f"**{ok}/{total} found correctly** (module and heads per site agree with the runtime probe; "
         "heads/KV heads per site listed).", "", "| entry | status | detail |", "|---|---|---|"]
lines += [f"| {r['entry']} | {r['status']} | {r['detail']} |" for r in rows]
(out / "beyond_zoo.md").write_text("\n".join(lines) + "\n")
print(f"{ok}/{total} found correctly")
