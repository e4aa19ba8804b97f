"""How well a model's UNet predicts clean latents, by noise level: a diagnostic for training.

    python experiments/denoise_error.py weights/magicvideo_default.safetensors
    python experiments/denoise_error.py runs/x/model.safetensors --given-first-frame

On a seeded batch of world clips (training split), noised as in training (the model's own
noise prior), prints the mean squared error of the UNet's x0 prediction on frames 1.. at a
few timesteps; with --given-first-frame also with frame 0 given clean at timestep 0, which
shows how much an image-first model uses its first frame.
"""

import argparse

import torch

from magicvideo.models import checkpoint, world
from magicvideo.models.sampling import predict_x0, training_schedule, video_noise


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a full MagicVideo file (UNet, VAE, built-in text encoder)")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--seed", type=int, default=321)
    p.add_argument("--timesteps", type=int, nargs="+", default=[999, 800, 500, 200])
    p.add_argument("--given-first-frame", action="store_true")
    args = p.parse_args()

    torch.manual_seed(0)
    m = checkpoint.load_model(args.model)
    unet, vae, text = m.unet.eval(), m.vae.eval(), m.text_encoder.eval()
    videos, captions, _ = world.batch(args.seed, args.clips)
    b, f = videos.shape[:2]
    x0 = vae.encode(videos.flatten(0, 1), chunk_size=None)
    context, _ = text.encode(captions)
    alphas = training_schedule()
    first = (torch.arange(b * f) % f) == 0
    print(f"x0 variance {x0[~first].var().item():.4f}; x0 MSE of frames 1..{f - 1}:")
    for t in args.timesteps:
        row = []
        for given in [False, True] if args.given_first_frame else [False]:
            torch.manual_seed(1)
            ts = torch.full((b * f,), t)
            noise = video_noise(x0.shape, f, unet.config.noise_sharing)
            a = alphas[ts].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            if given:
                xt, ts = torch.where(first.view(-1, 1, 1, 1), x0, xt), ts.masked_fill(first, 0)
            out = unet(xt, ts, context, num_frames=f)
            pred = predict_x0(out, xt, a, unet.config.prediction_type)
            row.append(f"{'given frame 0' if given else 'alone'} {((pred - x0) ** 2)[~first].mean().item():.4f}")
        print(f"  t={t:4d}: " + ", ".join(row))


if __name__ == "__main__":
    main()
