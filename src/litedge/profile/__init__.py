"""lit-profile: latency per device, component, size and operator group (torch-free)."""

from litedge.profile.measure import BundleProfile, SizeProfile, Timing, profile_bundle

__all__ = ["BundleProfile", "SizeProfile", "Timing", "profile_bundle"]
