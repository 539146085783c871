"""Build a Stable Diffusion 3.5 Medium-*sized* diffusers pipeline with random weights and save it (safetensors).

For benchmarks and GPU smoke tests where the real weights cannot be downloaded: speed and memory depend on the
shapes of the computation, not on the values of the weights.

* transformer: the SD3.5-Medium ``SD3Transformer2DModel`` config (24 MMDiT-X layers, width 1536, dual attention in
  layers 0–12, qk RMS-norm; ≈ 2.2 B parameters);
* VAE: the SD3 ``AutoencoderKL`` config (16 latent channels, downsampling 8, scaling 1.5305, shift 0.0609);
* text encoders: one-layer CLIP / T5 encoders whose *output* widths match SD3.5's (CLIP-L 768, CLIP-G 1280, T5 4096),
  so the transformer sees prompt embeddings of the real shape (77 + ``max_sequence_length`` tokens); the tokenizers
  are the small fixtures committed under ``tests/fixtures/tokenizers``. Prompt encoding is cached by the trainer, so
  full-size encoders would only add load time and memory (≈ 11 GB, see docs/scaling.md).

``--size tiny`` builds the same pipeline with a one-layer, narrow transformer and VAE (seconds on a CPU) to check the
script itself.

    python scripts/make_random_pipeline.py /tmp/sd35m_random [--size sd35m|tiny] [--dtype bf16] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tpgrpo.models.sd3 import DTYPES

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizers"

SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
TINY_TRANSFORMER = dict(SD35M_TRANSFORMER, num_layers=1, attention_head_dim=16, num_attention_heads=2,
                        caption_projection_dim=32, dual_attention_layers=(0,))
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
TINY_VAE = dict(SD3_VAE, block_out_channels=[8, 8, 8, 8], layers_per_block=1, norm_num_groups=4)


def build(size: str = "sd35m"):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, \
        StableDiffusion3Pipeline
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                              T5TokenizerFast)

    def clip(hidden: int):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=1100, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
            num_attention_heads=hidden // 64, max_position_embeddings=77, projection_dim=hidden,
            bos_token_id=1095, eos_token_id=1096, pad_token_id=1096))

    t5 = T5EncoderModel(T5Config(vocab_size=288, d_model=4096, d_kv=64, d_ff=1024, num_layers=1, num_heads=8,
                                 relative_attention_num_buckets=32, dropout_rate=0.0))
    clip_tok = CLIPTokenizer.from_pretrained(FIXTURES / "clip")
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**(SD35M_TRANSFORMER if size == "sd35m" else TINY_TRANSFORMER)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(**(SD3_VAE if size == "sd35m" else TINY_VAE)),
        text_encoder=clip(768), tokenizer=clip_tok, text_encoder_2=clip(1280), tokenizer_2=clip_tok,
        text_encoder_3=t5, tokenizer_3=T5TokenizerFast.from_pretrained(FIXTURES / "t5"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", choices=["sd35m", "tiny"], default="sd35m")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the random initialisation runs (a GPU makes the 2.2 B-parameter init fast)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        pipe = build(args.size)
    pipe.to(dtype=DTYPES[args.dtype])
    n = sum(p.numel() for p in pipe.transformer.parameters())
    pipe.save_pretrained(str(args.out), safe_serialization=True)
    print(f"{args.out}: {args.size} pipeline, transformer {n / 1e9:.3f} B parameters, {args.dtype}, "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
