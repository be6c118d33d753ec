"""The demo's synthetic subject: real PNGs, the toy's colours present, a different pose in each image."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from dreambooth_cli import subject


def test_subject_images_are_valid_distinct_pngs(tmp_path: Path) -> None:
    paths = subject.write_subject(tmp_path, size=48)
    assert len(paths) == len(subject.POSES)
    images = [Image.open(p) for p in paths]
    for img in images:
        assert img.size == (48, 48)
        assert img.mode == "RGB"
        colours = {c for _, c in img.getcolors(48 * 48) or []}
        for part in (subject.BODY, subject.HAT, subject.BASE, subject.PUPIL):
            assert part in colours
    assert len({img.tobytes() for img in images}) == len(images)


def test_body_is_at_the_pose_centre(tmp_path: Path) -> None:
    (path,) = subject.write_subject(tmp_path, size=64, count=1)
    pose = subject.POSES[0]
    img = Image.open(path)
    # Between the eyes and the base: the body's colour.
    assert img.getpixel((int(pose.cx * 64), int(pose.cy * 64 + 0.3 * pose.scale * 64))) == subject.BODY
    assert img.getpixel((1, 1)) != subject.BODY
