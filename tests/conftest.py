"""Test-wide settings."""

from hypothesis import settings

# Property tests check behaviour, not speed: a loaded CI machine must not turn a slow example
# into a failure (Hypothesis's default is a 200 ms deadline per example).
settings.register_profile("ztagent", deadline=None)
settings.load_profile("ztagent")
