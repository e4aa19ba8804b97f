"""How far apart a VAE puts the world's shapes (and colours) in latent space: a diagnostic for
the VAE a UNet is trained on.

    python experiments/latent_separation.py weights/magicvideo_default.safetensors

Renders the same object (same colour, place, size and orientation) as each shape, VAE-encodes
the clips and compares the latents: the RMS and largest difference, in units of the latents'
own standard deviation, and the last training timestep at which the largest difference still
stands above the noise (sqrt(abar) * d >= sqrt(1 - abar)). Above that timestep the noised
latent does not show which shape it is, and the UNet must draw it from the caption alone, to
the precision the difference asks for. A colour pair is printed beside the shapes for scale.
"""

import argparse
import itertools

import numpy as np
import torch

from magicvideo.models import checkpoint, world
from magicvideo.models.sampling import training_schedule


def _objects(rng: np.random.Generator, n: int):
    """n placements (colour, centre, radius, angle) in the default size range, sub-cell offsets
    included, each later rendered once per shape."""
    lo, hi = world.DEFAULT_RADIUS_RANGE
    for _ in range(n):
        yield dict(colour=str(rng.choice(world.COLOURS)), motion="still", speed=None,
                   x=float(rng.uniform(0.3, 0.7)), y=float(rng.uniform(0.3, 0.7)),
                   radius=float(rng.uniform(lo, hi)), angle=float(rng.uniform(0, 2 * np.pi)))


def last_visible_timestep(d: float, alphas_cumprod: torch.Tensor) -> int:
    """Largest t at which a latent difference d (latent units) is at least one noise std."""
    visible = (alphas_cumprod.sqrt() * d >= (1 - alphas_cumprod).sqrt()).nonzero()
    return int(visible.max()) if len(visible) else -1


@torch.no_grad()
def separation(model: str, placements: int = 16, seed: int = 0, size: int = world.REFERENCE_SIZE) -> dict:
    """{pair name: {"rms": .., "max": .., "last_visible_t": ..}}; rms and max in units of the
    latent std, max the mean over placements of the largest per-element difference."""
    bundle = checkpoint.load_model(model)
    if bundle.vae is None:
        raise SystemExit(f"{model}: expected a MagicVideo file with a VAE, found none")
    vae = bundle.vae.eval()
    rng = np.random.default_rng(seed)
    objs = list(_objects(rng, placements))
    specs = [world.ClipSpec(objects=(world.ObjectSpec(shape=s, **o),)) for o in objs for s in world.SHAPES]
    # a colour pair for scale: the same circle in the placement's colour and in its palette neighbour
    nxt = {c: world.COLOURS[(i + 1) % len(world.COLOURS)] for i, c in enumerate(world.COLOURS)}
    specs += [world.ClipSpec(objects=(world.ObjectSpec(shape="circle", **{**o, "colour": nxt[o["colour"]]}),))
              for o in objs]
    frames = world.render_batch(specs, frames=1, size=size)[:, 0]  # [N, H, W, 3]
    z = vae.encode(frames.movedim(-1, 1) * 2 - 1, chunk_size=None).float()
    std = z.std().item()
    k = len(world.SHAPES)
    by_shape = z[: placements * k].view(placements, k, *z.shape[1:])
    alphas = training_schedule()
    pairs = {f"{a} vs {b}": (by_shape[:, i], by_shape[:, j])
             for (i, a), (j, b) in itertools.combinations(enumerate(world.SHAPES), 2)}
    pairs["colour neighbours (circle)"] = (by_shape[:, 0], z[placements * k:])
    out = {"latent_std": std}
    for name, (a, b) in pairs.items():
        d = (a - b).abs()
        peak = d.flatten(1).amax(1).mean().item()
        out[name] = {"rms": d.pow(2).mean().sqrt().item() / std, "max": peak / std,
                     "last_visible_t": last_visible_timestep(peak, alphas)}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a MagicVideo file with a VAE")
    p.add_argument("--placements", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=world.REFERENCE_SIZE, help="frame side in pixels (objects scale with it)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = separation(args.model, args.placements, args.seed, args.size)
    print(f"latent std {res.pop('latent_std'):.3f}; differences in latent stds, over {args.placements} placements:")
    print(f"{'pair':<28} {'rms':>7} {'max':>7}  last timestep the difference stands above the noise")
    for name, r in res.items():
        print(f"{name:<28} {r['rms']:7.3f} {r['max']:7.3f}  {r['last_visible_t']}")


if __name__ == "__main__":
    main()
