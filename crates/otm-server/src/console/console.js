// The otm console's only script: live regions, live filtering and the log tail. Every page
// works without it. No inline script anywhere (the content security policy forbids it).
"use strict";

(function () {
  // A fragment that answers with the sign-in page means the session lapsed: go there.
  function signedOut(resp) {
    return resp.redirected && new URL(resp.url).pathname === "/signin";
  }

  // Elements with data-live="URL" are refreshed from URL every data-every milliseconds, unless
  // the keyboard focus is inside them (replacing it would lose the user's place).
  function live(el) {
    var every = parseInt(el.getAttribute("data-every"), 10) || 3000;
    var busy = false;
    function refresh(query) {
      if (busy || document.hidden || el.contains(document.activeElement)) return;
      busy = true;
      var url = el.getAttribute("data-live") + (query === undefined ? location.search : query);
      fetch(url, { credentials: "same-origin", cache: "no-store" })
        .then(function (resp) {
          if (signedOut(resp)) { location.assign("/signin"); return null; }
          return resp.ok ? resp.text() : null;
        })
        .then(function (html) {
          if (html !== null && html !== undefined && el.innerHTML !== html) el.innerHTML = html;
        })
        .catch(function () { /* the next round tries again */ })
        .then(function () { busy = false; });
    }
    setInterval(refresh, every);
    el.otmRefresh = refresh;
  }

  // The fleet filter applies as it is typed, and the address keeps it.
  function filter(form) {
    var rows = document.getElementById("fleet-rows");
    if (!rows) return;
    function apply() {
      var params = new URLSearchParams(new FormData(form));
      var query = "?" + params.toString();
      history.replaceState(null, "", query);
      if (rows.otmRefresh) rows.otmRefresh(query);
    }
    form.addEventListener("input", apply);
    form.addEventListener("change", apply);
  }

  // The log tail: streamed from data-logs with follow, asked for again when the stream ends
  // (the tenant woke, stopped or moved).
  function logTail(pre) {
    var url = pre.getAttribute("data-logs") + "?tail=200&follow=true";
    var decoder = new TextDecoder();
    function atBottom() { return pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24; }
    function append(text) {
      var stick = atBottom();
      pre.appendChild(document.createTextNode(text));
      // Keep the tail bounded: the oldest text goes first.
      while (pre.textContent.length > 200000 && pre.firstChild) pre.removeChild(pre.firstChild);
      if (stick) pre.scrollTop = pre.scrollHeight;
    }
    function again() { setTimeout(follow, 2000); }
    function follow() {
      fetch(url, { credentials: "same-origin", cache: "no-store" })
        .then(function (resp) {
          if (signedOut(resp)) { location.assign("/signin"); return; }
          pre.textContent = "";
          if (!resp.ok || !resp.body) { append("(the log cannot be read now)\n"); again(); return; }
          var reader = resp.body.getReader();
          function pump() {
            return reader.read().then(function (r) {
              if (r.done) { again(); return; }
              append(decoder.decode(r.value, { stream: true }));
              return pump();
            });
          }
          return pump();
        })
        .catch(again);
    }
    follow();
  }

  function start() {
    document.querySelectorAll("[data-live]").forEach(live);
    document.querySelectorAll("form[data-filter]").forEach(filter);
    document.querySelectorAll("pre[data-logs]").forEach(logTail);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
