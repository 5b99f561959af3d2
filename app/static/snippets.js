"use strict";
// "Copy as curl" and "Copy as Python": the request the page just made, as a command to paste.
// A prompt is the user's text and may hold anything: quotes, $(...), backticks, newlines.
// The shell command single-quotes every argument (a ' inside becomes '\'' : close the quotes,
// an escaped quote, open them again), so the shell runs nothing from it and curl receives the
// text as it was. The Python snippet writes each value as a Python literal (true, false, null
// as True, False, None; absent fields left out). Loaded by the page before app.js, and by
// node in the tests (tests/test_snippets.py).
const craftSnippets = (() => {
  // One POSIX shell word that is exactly `text`, whatever it holds.
  function shellQuote(text) {
    return "'" + String(text).replace(/'/g, "'\\''") + "'";
  }

  function curlCommand(origin, body) {
    return ["curl", "-X", "POST", shellQuote(origin + "/jobs"),
      "-H", shellQuote("Authorization: Bearer YOUR_KEY"),
      "-H", shellQuote("Content-Type: application/json"),
      "--data-binary", shellQuote(JSON.stringify(body))].join(" ");
  }

  // A Python expression equal to what JSON.stringify(value) sends: a JSON string literal is
  // a valid Python one (JSON's escapes are Python's); what JSON leaves out (undefined, functions)
  // is left out here too, and what it writes as null (NaN, Infinity) is None.
  function pythonLiteral(value) {
    if (value === null || value === undefined) return "None";
    if (value === true) return "True";
    if (value === false) return "False";
    if (typeof value === "number") return Number.isFinite(value) ? JSON.stringify(value) : "None";
    if (typeof value === "string") return JSON.stringify(value);
    if (Array.isArray(value)) {
      return "[" + value.map((item) => (kept(item) ? pythonLiteral(item) : "None")).join(", ") + "]";
    }
    const items = Object.entries(value).filter(([, item]) => kept(item));
    return "{" + items.map(([k, item]) => JSON.stringify(k) + ": " + pythonLiteral(item)).join(", ") + "}";
  }

  function kept(value) {
    return value !== undefined && typeof value !== "function" && typeof value !== "symbol";
  }

  function pythonSnippet(origin, body) {
    const fields = { token: "YOUR_KEY" };
    for (const [k, v] of Object.entries(body)) if (k !== "previews" && kept(v)) fields[k] = v;
    return "import requests\n\n" +
      "answer = requests.post(" + JSON.stringify(origin + "/sd") + ", json=" + pythonLiteral(fields) + ")\n" +
      "answer.raise_for_status()\n" +
      'open("image.png", "wb").write(answer.content)\n';
  }

  return { shellQuote, curlCommand, pythonLiteral, pythonSnippet };
})();
if (typeof module !== "undefined" && module.exports) module.exports = craftSnippets;
