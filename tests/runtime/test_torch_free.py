"""litedge.runtime generates with torch, diffusers and transformers made unimportable."""

import subprocess
import sys
import textwrap


def test_runtime_generates_without_torch(pixart_bundle, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        for name in ("torch", "diffusers", "transformers", "onnx"):
            sys.modules[name] = None  # import raises ImportError
        from litedge.runtime import Pipeline, save_png
        from litedge.cli.generate import main
        image = Pipeline.from_bundle({str(pixart_bundle)!r}, device="cpu")("a cat", steps=2, progress=False)[0]
        save_png(image, {str(tmp_path / "a.png")!r})
        assert main(["a dog", "--bundle", {str(pixart_bundle)!r}, "--steps", "2", "--quiet",
                     "-o", {str(tmp_path / "b.png")!r}]) == 0
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers", "onnx")
                        and sys.modules[m] is not None)
        assert not loaded, loaded
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
    assert (tmp_path / "a.png").is_file() and (tmp_path / "b.png").is_file()
