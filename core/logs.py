"""A run's folder and logs: LOGS_ROOT/SAVE_DIR/<timestamp> with args.json, info.log and debug.log (never
overwritten), one clear line for an error the user can fix, and how to resume after Ctrl-C."""

import logging
import os
import sys
import traceback

from core import files
from core.errors import user_error_message


def start_run(save_dir, logs_root, flags, notes=(), console="info", resumable=False):
    """A new run folder under logs_root/save_dir holding args.json (flags: {flag: value}, with the git commit and the
    command) and the run's logs (setup_logging: on Ctrl-C a resumable run tells how to continue from its
    last_checkpoint.pth); logs the command, the flags, the folder and the notes (parser.implicit_settings: what the
    flags became). Returns the folder."""
    output_folder = files.make_output_folder(save_dir, logs_root)
    checkpoint_path = os.path.join(output_folder, "last_checkpoint.pth")
    setup_logging(output_folder, console, interrupt_message=(lambda: resume_hint(checkpoint_path)) if resumable
                  else None)
    files.atomic_json_dump({**flags, "git_commit": files.git_commit(), "command": " ".join(sys.argv)},
                           os.path.join(output_folder, "args.json"))
    logging.info(" ".join(sys.argv))
    logging.info(f"Arguments: {flags}")
    logging.info(f"The outputs are being saved in {output_folder}")
    for level, note in notes:
        logging.log(level, note)
    return output_folder


def setup_logging(output_folder, console="info", info_filename="info.log", debug_filename="debug.log",
                  interrupt_message=None):
    """Logs to output_folder/info.log (info and above), debug.log (everything) and the console.
    Files are opened in append mode: nothing a user has is ever overwritten."""
    os.makedirs(output_folder, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG)
    formatter = logging.Formatter("%(asctime)s   %(message)s", "%Y-%m-%d %H:%M:%S")
    for filename, level in ((info_filename, logging.INFO), (debug_filename, logging.DEBUG)):
        if filename is not None:
            handler = logging.FileHandler(os.path.join(output_folder, filename), mode="a")
            handler.setLevel(level)
            handler.setFormatter(formatter)
            root.addHandler(handler)
    if console is not None:
        handler = logging.StreamHandler(sys.stdout)
        handler.setLevel(getattr(logging, console.upper()))
        handler.setFormatter(formatter)
        handler.addFilter(lambda record: not getattr(record, "file_only", False))
        root.addHandler(handler)
    for noisy in ("PIL", "matplotlib", "urllib3", "timm", "httpx", "huggingface_hub", "filelock", "torch._dynamo",
                  "torch._inductor", "torch.fx", "torch._subclasses"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    def log_exception(exc_type, value, tb):
        """A bug shows its traceback; an error the user can fix shows one clear line (exit code 1), and Ctrl-C
        one line from interrupt_message() (e.g. how to resume); their tracebacks only go to debug.log."""
        full_traceback = "".join(traceback.format_exception(exc_type, value, tb))
        message = user_error_message(value)
        if isinstance(value, KeyboardInterrupt):
            message = interrupt_message() if interrupt_message else "interrupted (Ctrl-C)"
        if message is None:
            logging.error(full_traceback)
            return
        logging.debug(full_traceback, extra={"file_only": True})
        details = f" (traceback in {os.path.join(output_folder, debug_filename)})" if debug_filename else ""
        logging.error(f"{'INTERRUPTED' if isinstance(value, KeyboardInterrupt) else 'ERROR'}: {message}{details}")
    sys.excepthook = log_exception


def resume_hint(checkpoint_path, argv=None):
    """What Ctrl-C prints: the last good checkpoint and the command that continues from it."""
    if not os.path.exists(checkpoint_path):
        return f"no checkpoint was written yet ({checkpoint_path}): start the run again"
    argv = sys.argv if argv is None else argv
    flags = [a for i, a in enumerate(argv) if "--resume_train" not in (a, argv[i - 1] if i else "")]
    return (f"the last good checkpoint is {checkpoint_path}; continue with: python {' '.join(flags)} "
            f"--resume_train {checkpoint_path}")
