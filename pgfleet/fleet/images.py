"""Which images a database may name: `postgres` at a major version this host has installed
(Debian's /usr/lib/postgresql/<major>), with or without a registry prefix, as Unikraft
Cloud-style clients spell it. Anything else is refused with the list of what is available,
rather than accepted and silently run on another version."""

from __future__ import annotations

import re

from .errors import InvalidRequest

_IMAGE = re.compile(r"^(?:[a-z0-9.-]+(?::[0-9]+)?/)*(?:library/)?postgres(?::(?P<tag>[A-Za-z0-9._-]{1,128}))?"
                    r"(?:@sha256:[0-9a-f]{64})?$")


def installed_majors() -> list[int]:
    from pgfleet.drivers.pgbin import DEBIAN_ROOT

    return sorted((int(p.name) for p in DEBIAN_ROOT.glob("*") if p.name.isdigit() and (p / "bin/postgres").exists()),
                  reverse=True)


def available_images() -> list[str]:
    majors = installed_majors()
    return [f"postgres:{m}" for m in majors] + (["postgres", "postgres:latest"] if majors else [])


def check_image(image: str) -> str:
    """The image if this host can run it, else InvalidRequest naming the available ones."""
    match = _IMAGE.match(image or "")
    majors = installed_majors()
    tag = match.group("tag") if match else None
    ok = match is not None and (
        tag in (None, "latest") or tag.split(".", 1)[0].split("-", 1)[0] in {str(m) for m in majors})
    if not ok or not majors:
        raise InvalidRequest(f"image {image!r} is not available on this host; available: "
                             f"{', '.join(available_images()) or 'none (no PostgreSQL installed)'}")
    return image
