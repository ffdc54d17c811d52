"""Chat templates: reading a --chat-template file (Jinja text, or a tokenizer_config.json / chat_template.json
holding one), checking its syntax, and setting it on a tokenizer."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import DataError

# ---------------------------------------------------------------------- templates
def read_chat_template(path: str | Path) -> str:
    """The Jinja text of a ``--chat-template FILE`` (a .jinja file, or a tokenizer_config.json holding one), a leading
    byte-order mark dropped; a missing, unreadable, empty or non-compiling file is a DataError naming it."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError(f"--chat-template {path} is a directory; give the template file (a .jinja file, or the "
                        "tokenizer_config.json holding one)")
    if not path.is_file():
        raise DataError(f"--chat-template {path}: no such file; give a Jinja template file (e.g. "
                        "examples/chat_templates/gemma3.jinja)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"--chat-template {path} could not be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"--chat-template {path} is not UTF-8 text (byte {exc.start} is {raw[exc.start:exc.start + 1]!r}); "
                        "save it as UTF-8") from None
    if not text.strip():
        raise DataError(f"--chat-template {path} is empty; give a Jinja chat template (e.g. "
                        "examples/chat_templates/gemma3.jinja)")
    if path.suffix == ".json":
        import json

        try:
            text = json.loads(text).get("chat_template")
        except (ValueError, AttributeError, RecursionError):
            text = None
        if isinstance(text, list):  # named templates, as some tokenizer_config.json files hold: the default one
            text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
        if not isinstance(text, str):
            raise DataError(f"--chat-template {path}: a JSON file must hold a \"chat_template\" string (as "
                            "tokenizer_config.json does)")
        text = text.lstrip("\ufeff")
    if "{{" not in text and "{%" not in text:
        raise DataError(f"--chat-template {path} holds no Jinja ({{{{ ... }}}} or {{% ... %}}); it is not a chat template")
    problem = template_syntax_error(text)
    if problem:
        raise DataError(f"--chat-template {path}: {problem}; fix the template")
    return text


def template_syntax_error(template: str) -> str:
    """Why the Jinja ``template`` does not compile as transformers compiles chat templates ("" when it does)."""
    try:
        import jinja2
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # another transformers: the first render reports it
        return ""
    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as exc:
        return f"Jinja syntax error on line {exc.lineno}: {exc.message}"
    except Exception as exc:  # jinja2's other errors, a recursion in the parser
        return f"the template does not compile ({type(exc).__name__}: {str(exc).strip()[:200]})"
    return ""


def use_chat_template(tokenizer, template: str | None, source: str = "") -> None:
    """Set ``template`` on ``tokenizer``; without one the tokenizer must bring its own."""
    if template is not None:
        tokenizer.chat_template = template.lstrip("\ufeff")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source or 'this data'} holds conversations but the tokenizer has no chat template to format "
                        "them; pass --chat-template FILE (a Jinja template, e.g. examples/chat_templates/gemma3.jinja "
                        "for Gemma 3)")
