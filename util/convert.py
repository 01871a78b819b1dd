"""``python -m util.convert`` (the documented command) runs models/convert.py: converting checkpoints is model
knowledge, and util/ imports nothing from models/."""
import runpy

if __name__ == "__main__":
    runpy.run_module("models.convert", run_name="__main__", alter_sys=True)
