"""``dinollama chat``: a REPL like the ones users know, over the one generation engine.

On a terminal: readline editing and history, Ctrl-C stops the reply being written (or clears the
line at the prompt), Ctrl-D or ``/exit`` ends, ``/reset`` and ``/system TEXT`` change the dialog.
Piped: no prompts, one answer per input line. The dialog is trimmed from its oldest exchanges when
it would not fit the context, and each reply gets at most the room that is left.
"""

from __future__ import annotations

import dataclasses
import sys

from .code import load_generator, sampling_params

HELP = "commands: /reset (forget the dialog), /system TEXT (set the system prompt; empty clears it), /exit"
MIN_REPLY = 32  # tokens of room a reply gets at least; older exchanges are dropped to make it


class ChatSession:
    """The dialog and its turn logic, apart from terminal input so that it can be tested."""

    def __init__(self, gen, params, system: str = "") -> None:
        self.gen, self.params, self.system = gen, params, system
        self.turns: list[dict] = []
        tok = gen.tokenizer
        self.stop = tok.step_id if tok.step_id is not None else tok.eos_id

    def dialog(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def command(self, line: str) -> str | None:
        """Handle a ``/command``; returns what to print, or ``"exit"``."""
        name, _, rest = line.partition(" ")
        if name in ("/exit", "/quit", "/bye"):
            return "exit"
        if name == "/reset":
            self.turns = []
            return "dialog cleared"
        if name == "/system":
            self.system, self.turns = rest.strip(), []
            return f"system prompt {'set' if self.system else 'cleared'}; dialog cleared"
        return f"unknown command {name}; {HELP}"

    def reply(self, user: str, write) -> str:
        """Stream the answer to ``user`` through ``write``; Ctrl-C stops it and keeps what was written."""
        from ..codellama import fit_dialog

        context = self.gen.model.params.max_seq_len
        dialog = self.dialog() + [{"role": "user", "content": user}]
        prompt, dropped = fit_dialog(self.gen.tokenizer, dialog, context, min(MIN_REPLY, self.params.max_gen_len))
        if dropped:
            self.turns = self.turns[2 * dropped :]
            print(f"note: dropped the {dropped} oldest exchange(s) to fit the {context}-token context", file=sys.stderr)
        params = dataclasses.replace(self.params, max_gen_len=min(self.params.max_gen_len, context - len(prompt)))
        text = ""
        try:
            for piece in self.gen.stream(prompt, params, stop_token=self.stop):
                text += piece
                write(piece)
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
        finally:
            self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": text.strip() or "..."}]
        return text


def _read_line(interactive: bool, prompt: str) -> str | None:
    """One input line (``None`` at end of input); on a terminal Ctrl-C clears the line."""
    while True:
        try:
            if not interactive:
                line = sys.stdin.readline()
                return line.rstrip("\n") if line else None
            if sys.stdout.isatty():
                return input(prompt)
            print(prompt, end="", file=sys.stderr, flush=True)
            return input()
        except EOFError:
            return None
        except KeyboardInterrupt:
            print(file=sys.stderr)


def cmd_chat(args) -> int:
    params = sampling_params(args)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (importing it gives input() line editing and history)
    session = ChatSession(load_generator(args), params, args.system)
    if interactive:
        print(f"Chat with {args.model}; {HELP}; Ctrl-C stops a reply, Ctrl-D ends.", file=sys.stderr)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    while (line := _read_line(interactive, "you> ")) is not None:
        if not line.strip():
            continue
        if line.startswith("/"):
            said = session.command(line.strip())
            if said == "exit":
                break
            print(said, file=sys.stderr)
            continue
        if interactive:
            print("assistant> ", end="", flush=True, file=sys.stdout if sys.stdout.isatty() else sys.stderr)
        try:
            session.reply(line, write)
        except ValueError as e:  # this message alone does not fit, or has a special tag: say so, go on
            print(f"error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # before the first token
            print("\n(stopped)", file=sys.stderr)
        write("\n")
    return 0
