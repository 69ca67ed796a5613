"""Does a trained VAE beat a baseline that keeps as many values per second?

On held-out clips (an audio manifest, e.g. the shard stage's ``val/manifest.json``) the VAE's
reconstruction (encode, take the latent mean, decode) is compared with a fixed baseline that keeps the
same number of values per second: the audio resampled (soxr) down to ``latent_channels x latent rate``
samples per second and back up. Both are scored against the input with SI-SDR (dB, higher is better) and
the multi-resolution STFT distance (the demo VAE's own spectral loss, without A-weighting; lower is
better). It also prints each latent channel's signal-to-noise ratio as the diffusion model sees it.

    python bench/vae_quality.py --vae <VAE train ledger or .safetensors> --data <audio manifest URL>
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import manifest as mf  # noqa: E402
from pipeline.config import PretransformConfig, load_model_config  # noqa: E402
from pipeline.data import audio as audio_io  # noqa: E402
from pipeline.data.shards import iter_samples  # noqa: E402
from pipeline.models.autoencoder_losses import MultiResolutionSTFTLoss  # noqa: E402
from pipeline.models.blocks import fold_weight_norm  # noqa: E402
from pipeline.models.pretransforms import create_pretransform_from_config  # noqa: E402
from pipeline.models.weights import load_autoencoder_weights  # noqa: E402
from pipeline.pre_encode import resolve_weights_url  # noqa: E402


def si_sdr(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Scale-invariant SDR in dB (Le Roux et al. 2019), over all channels at once."""
    ref, est = reference.reshape(-1).astype(np.float64), estimate.reshape(-1).astype(np.float64)
    target = (est @ ref) / max(ref @ ref, 1e-12) * ref
    return float(10 * np.log10(max(target @ target, 1e-12) / max((est - target) @ (est - target), 1e-12)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vae", required=True, help="VAE weights (.safetensors) or its train ledger")
    p.add_argument("--config", default=str(ROOT / "configs/demo_vae.json"), help="the VAE's autoencoder config")
    p.add_argument("--data", required=True, help="audio manifest URL of held-out clips")
    p.add_argument("--max-clips", type=int, default=64)
    args = p.parse_args()

    cfg = load_model_config(args.config)
    auto = cfg.model.autoencoder
    block = PretransformConfig(type="autoencoder", config=cfg.raw["model"], autoencoder=auto)
    pretransform = create_pretransform_from_config(block, cfg.sample_rate, cfg.audio_channels)
    load_autoencoder_weights(pretransform.model, resolve_weights_url(args.vae))
    fold_weight_norm(pretransform.model, inplace=True)
    pretransform.eval()
    values_per_second = auto.latent_dim * cfg.sample_rate / auto.downsampling_ratio
    stft = MultiResolutionSTFTLoss([512, 256, 128, 64, 32], [128, 64, 32, 16, 8], [512, 256, 128, 64, 32])

    scores = {"vae": ([], []), "resample": ([], [])}
    means, variances = [], []
    for entry in mf.read_manifest(args.data, stage="shard").outputs:
        for _key, members in iter_samples(entry["url"]):
            if len(scores["vae"][0]) >= args.max_clips:
                break
            audio, _ = audio_io.decode(members["flac"])
            audio = audio[:, : audio.shape[-1] // auto.downsampling_ratio * auto.downsampling_ratio]
            with torch.inference_mode():
                mean, std = pretransform.encode_mean_std(torch.from_numpy(audio)[None])
                means.append(mean[0])
                variances.append(std[0].square())
                vae = pretransform.model.decode(mean)[0].numpy()
            low = audio_io.resample(audio, cfg.sample_rate, int(values_per_second / cfg.audio_channels))
            base = audio_io.resample(low, int(values_per_second / cfg.audio_channels), cfg.sample_rate)
            base = np.pad(base, ((0, 0), (0, max(0, audio.shape[-1] - base.shape[-1]))))[:, : audio.shape[-1]]
            for name, estimate in (("vae", vae), ("resample", base)):
                scores[name][0].append(si_sdr(estimate, audio))
                scores[name][1].append(float(stft(torch.from_numpy(estimate)[None], torch.from_numpy(audio)[None])))
    n = len(scores["vae"][0])
    print(f"{n} held-out clips, {values_per_second:.0f} values/s kept by both "
          f"({auto.latent_dim} latent channels x {cfg.sample_rate / auto.downsampling_ratio:.1f} frames/s)")
    # What the DiT sees is a posterior sample: a channel whose means vary less than its noise carries
    # little. Per channel: variance of the means over all frames / mean posterior variance, in dB.
    means = torch.cat(means, -1)  # (channels, all frames of all clips)
    snr = means.var(-1) / torch.cat(variances, -1).mean(-1)
    snr_db = (10 * snr.log10()).sort(descending=True).values
    print(f"latent SNR per channel (dB, best first): {' '.join(f'{v:.1f}' for v in snr_db.tolist())}")
    # SAT's pretransform `scale` divides the latents: their std is the value that gives the DiT unit variance.
    print(f"std of the latent means: {means.std().item():.3f} (a pretransform `scale` for unit variance)")
    print(f"{'method':<10} {'SI-SDR dB':>12} {'MRSTFT':>10}")
    for name, (sdr, dist) in scores.items():
        print(f"{name:<10} {np.mean(sdr):>8.2f} ± {np.std(sdr) / np.sqrt(n):.2f} "
              f"{np.mean(dist):>7.3f} ± {np.std(dist) / np.sqrt(n):.3f}")


if __name__ == "__main__":
    main()
