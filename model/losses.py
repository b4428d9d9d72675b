"""Sa2VA's training losses and the objects-per-frame rule, written out from the official code.

  * `lm_loss`: next-token cross-entropy over the tokens whose label is not -100 (HF causal-LM
    loss: logits[:, :-1] against labels[:, 1:], mean over the counted tokens).
  * `mask_losses`: projects/sa2va/models/sa2va.py `Sa2VAModel.forward` with
    `loss_sample_points=True`: PointRend / Mask2Former importance sampling of 12,544 points
    (`get_uncertain_point_coords_with_randomness`, oversample 3, importance 0.75), then
    mmdet's sigmoid CrossEntropyLoss x 2.0 (sum / (N * points + 1e-4)) and naive DiceLoss
    x 0.5 (eps 1, sum / (N + 1e-4)) on the sampled logits and targets.
  * `match_objects`: `Sa2VAModel.check_obj_number` (fix_number=5): per frame, prompts and
    ground-truth masks are cut to the shorter list, then sampled (more than 5) or repeated
    cyclically (fewer) to exactly 5.
The randomness (point sampling, object sampling) takes an explicit generator so that runs and
resumed runs are reproducible.
"""
import torch
import torch.nn.functional as F

IGNORE = -100
NUM_POINTS, OVERSAMPLE, IMPORTANCE = 12544, 3.0, 0.75
MASK_WEIGHT, DICE_WEIGHT = 2.0, 0.5
OBJECTS_PER_FRAME = 5


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, L, V) and labels (B, L) -> mean next-token cross-entropy (fp32)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the positions whose logits the LM loss reads (those that predict a label)."""
    pos = torch.zeros_like(labels, dtype=torch.bool)
    pos[:, :-1] = labels[:, 1:] != IGNORE
    return pos


def lm_loss_at(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """lm_loss from the logits (N, V) of `loss_positions(labels)` only (the forward computes no others)."""
    targets = labels[:, 1:][labels[:, 1:] != IGNORE]
    if targets.numel() == 0:  # nothing to predict: 0, still attached to the graph
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets)


def point_sample(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) at coords (N, P, 2) in [0, 1]^2 (x, y) -> (N, C, P), bilinear (detectron2 point_sample)."""
    return F.grid_sample(x, 2.0 * coords[:, :, None] - 1.0, align_corners=False)[..., 0]


def uncertain_points(logits: torch.Tensor, generator: torch.Generator | None,
                     num_points: int = NUM_POINTS) -> torch.Tensor:
    """(N, 1, h, w) mask logits -> (N, num_points, 2) points: the 75% most uncertain (|logit|
    smallest) of 3x as many uniform ones, and 25% fresh uniform ones."""
    n = logits.shape[0]
    candidates = torch.rand(n, int(num_points * OVERSAMPLE), 2, generator=generator, device=logits.device)
    uncertainty = -point_sample(logits, candidates)[:, 0].abs()  # (N, 3P)
    k = int(IMPORTANCE * num_points)
    top = uncertainty.topk(k, dim=1).indices  # (N, k)
    chosen = candidates.gather(1, top[..., None].expand(-1, -1, 2))
    fresh = torch.rand(n, num_points - k, 2, generator=generator, device=logits.device)
    return torch.cat([chosen, fresh], dim=1)


def mask_losses(logits: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None,
                num_points: int = NUM_POINTS, dense: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_mask, loss_dice) of mask logits (N, 1, h, w) against targets (N, h, w) (bool or 0/1).

    The official losses read num_points sampled points per mask, most where the logits are least
    sure. dense: every pixel instead (for a SAM-2 from scratch, which with the sampled points
    learned to say 'background' everywhere).

    With N = 0 both are 0 and still depend on `logits`, so every parameter that produced them
    gets a (zero) gradient: every process of a sharded run then runs the same graph.
    """
    n = logits.shape[0]
    if n == 0:
        zero = logits.sum() * 0.0
        return zero, zero
    logits = logits.float()
    if dense:
        pred, target = logits.flatten(1), targets.flatten(1).float()  # (N, h*w)
    else:
        with torch.no_grad():
            points = uncertain_points(logits, generator, num_points)
            target = point_sample(targets[:, None].float(), points)[:, 0]  # (N, P)
        pred = point_sample(logits, points)[:, 0]  # (N, P)
    bce = F.binary_cross_entropy_with_logits(pred, target, reduction="sum") / (pred.numel() + 1e-4)
    p = pred.sigmoid()
    dice = 1 - (2 * (p * target).sum(1) + 1) / (p.sum(1) + target.sum(1) + 1)  # naive dice, eps 1
    return MASK_WEIGHT * bce, DICE_WEIGHT * dice.sum() / (n + 1e-4)


def match_objects(n_prompts: int, n_masks: int, generator: torch.Generator | None = None,
                  fix: int = OBJECTS_PER_FRAME) -> list[int]:
    """check_obj_number for one frame: the indices (into both prompts and masks) of exactly `fix`
    objects, or [] when either list is empty."""
    n = min(n_prompts, n_masks)
    if n == 0:
        return []
    if n > fix:
        return torch.randperm(n, generator=generator)[:fix].tolist()
    return [i % n for i in range(fix)]
