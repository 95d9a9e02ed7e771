"""Qualcomm AI Hub: compile a QDQ graph for a real device and profile it there.

:class:`AIHub` wraps the ``qai_hub`` client (the only object here that talks to the
network: ``get_devices``, ``Device``, ``submit_compile_job``, ``submit_profile_job``).
Tests replace it by passing another object with those members, or by patching
:func:`connect`.

Example::

    hub = AIHub.connect_to("Samsung Galaxy S24 (Family)")   # LitedgeError without a token
    result = hub.compile_and_profile(Path("transformer.qdq.onnx"), name="transformer 1024x1024")
    result["estimated_inference_time_us"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litedge.errors import LitedgeError

TOKEN_HELP = ("--hub needs a Qualcomm AI Hub token: run `qai-hub configure --api_token TOKEN` "
              "(https://aihub.qualcomm.com), or drop --hub")
# An EPContext ONNX model for onnxruntime's QNN EP, compiled on Qualcomm's side.
COMPILE_OPTIONS = "--target_runtime precompiled_qnn_onnx"


def connect() -> Any:
    """The real network client: the ``qai_hub`` module."""
    try:
        import qai_hub
    except ModuleNotFoundError:
        raise LitedgeError("--hub needs the qai-hub package: pip install 'litedge[hub]', or drop --hub") from None
    return qai_hub


def _is_user_error(client: Any, exc: Exception) -> bool:
    user_error = getattr(client, "UserError", None)
    return isinstance(user_error, type) and isinstance(exc, user_error)


class AIHub:
    """Compile + profile jobs for one AI Hub device."""

    def __init__(self, client: Any, device: Any, device_name: str) -> None:
        self.client, self.device, self.device_name = client, device, device_name

    @classmethod
    def connect_to(cls, device_name: str, client: Any = None) -> AIHub:
        """Check the token and the device name now, before anything is exported.

        Raises:
            LitedgeError: no configured token (one line, :data:`TOKEN_HELP`), the service
                cannot be reached, or no device has that name.
        """
        client = connect() if client is None else client
        try:
            devices = list(client.get_devices(name=device_name))
        except Exception as exc:
            if _is_user_error(client, exc):
                raise LitedgeError(TOKEN_HELP) from None
            raise LitedgeError(f"--hub {device_name}: cannot reach Qualcomm AI Hub ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); retry, or drop --hub") from None
        if not devices:
            raise LitedgeError(f"--hub {device_name!r}: no such AI Hub device; list them with `qai-hub list-devices`")
        return cls(client, client.Device(device_name), device_name)

    def compile_and_profile(self, model: Path, *, name: str, options: str = COMPILE_OPTIONS) -> dict:
        """Submit ``model`` (a QDQ .onnx) for compilation, then profile the result; waits for both.

        Returns the report entry: job ids and URLs, status, and the profile's estimated
        inference time (microseconds) and peak memory (bytes) when it succeeded.
        """
        compile_job = self.client.submit_compile_job(model=str(model), device=self.device, name=name, options=options)
        entry: dict = {"device": self.device_name, "options": options,
                       "compile_job": _job_id(compile_job), "compile_url": getattr(compile_job, "url", None)}
        target = compile_job.get_target_model()  # waits; None if the compile failed
        if target is None:
            entry["status"] = f"compile failed: {_status(compile_job)}"
            return entry
        profile_job = self.client.submit_profile_job(model=target, device=self.device, name=name)
        entry.update(profile_job=_job_id(profile_job), profile_url=getattr(profile_job, "url", None))
        profile = profile_job.download_profile()  # waits
        summary = (profile or {}).get("execution_summary", {})
        entry.update(
            status="profiled",
            estimated_inference_time_us=summary.get("estimated_inference_time"),
            peak_memory_bytes=summary.get("estimated_inference_peak_memory")
            or (summary.get("inference_memory_peak_range") or [None, None])[1],
        )
        return entry


def _job_id(job: Any) -> str | None:
    return getattr(job, "job_id", None)


def _status(job: Any) -> str:
    status = job.get_status() if hasattr(job, "get_status") else None
    return str(getattr(status, "message", None) or getattr(status, "code", None) or status)
