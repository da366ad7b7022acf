"""Write agent trajectories into an arm folder: ``trajectories.jsonl`` + PNG images."""

from __future__ import annotations

from pathlib import Path

from agent.trajectory import Trajectory
from analysis import rundir


def save_trajectories(
    run: Path, arm: str, trajs: list[Trajectory], with_images: set[int] | None = None
) -> list[list[str] | None]:
    """Save ``trajs`` (token ids, masks, events, flags, reward) to ``<run>/<arm>/trajectories.jsonl``.

    Images of the trajectories whose index is in ``with_images`` (default all) are written to
    ``<run>/<arm>/images/<i>_<k>.png`` and referenced by relative path, so that the attention
    CLI can replay them later; the others keep ``ref: null``.

    Returns:
        Per trajectory, its image paths relative to the arm folder (None: not saved).
    """
    folder = Path(run) / arm
    records, all_refs = [], []
    for i, t in enumerate(trajs):
        refs = None
        if with_images is None or i in with_images:
            (folder / "images").mkdir(parents=True, exist_ok=True)
            refs = []
            for k, rec in enumerate(t.images):
                rel = f"images/{i:04d}_{k}.png"
                rec.image.save(folder / rel)
                refs.append(rel)
        records.append(t.to_record(refs))
        all_refs.append(refs)
    rundir.write_trajectories(run, arm, records)
    return all_refs
