// fluster-worker dashboard: kill confirmation and live log follow.
// Everything else on the pages works without JavaScript.
(function () {
  "use strict";

  // -- Kill: one confirm() instead of the confirmation page ----------------------
  document.querySelectorAll("form.kill").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm("Kill job " + form.dataset.job + "?\n\nSIGTERM, then SIGKILL after 5 s.")) {
        event.preventDefault();
        return;
      }
      var confirmed = form.querySelector("input[name=confirmed]");
      if (confirmed) {
        confirmed.value = "yes";
      }
    });
  });

  // -- Live follow: poll /api/v1/jobs/<id>/logs?after_seq=K while the job lives ------
  var log = document.getElementById("log");
  if (!log || log.dataset.follow !== "yes") {
    return;
  }
  var jobId = log.dataset.job;
  var source = log.dataset.source;
  var showSource = log.dataset.showSource === "yes";
  var limit = parseInt(log.dataset.limit, 10) || 1000;
  var afterSeq = parseInt(log.dataset.afterSeq, 10);
  var MAX_LINES = 5000;
  var RUNNING_MS = 500;
  var WAITING_MS = 1000;
  var RETRY_MS = 3000;
  var status = document.getElementById("follow-status");
  var stateBadge = document.getElementById("job-state");
  var phase = document.getElementById("job-phase");
  var empty = document.getElementById("log-empty");
  var finalPolls = 1;

  function say(text, kind) {
    if (!status) {
      return;
    }
    status.hidden = false;
    status.textContent = text;
    status.className = "follow " + (kind || "");
  }

  function pad(n, width) {
    var s = String(n);
    while (s.length < width) {
      s = "0" + s;
    }
    return s;
  }

  function clock(ms) {
    var d = new Date(ms);
    return pad(d.getUTCHours(), 2) + ":" + pad(d.getUTCMinutes(), 2) + ":" +
      pad(d.getUTCSeconds(), 2) + "." + pad(d.getUTCMilliseconds(), 3);
  }

  function span(cls, text) {
    var el = document.createElement("span");
    el.className = cls;
    el.textContent = text; // never innerHTML: log lines are hostile
    return el;
  }

  function nearBottom() {
    return log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  }

  function append(lines) {
    if (!lines.length) {
      return;
    }
    var stick = nearBottom();
    var fragment = document.createDocumentFragment();
    lines.forEach(function (line) {
      var row = document.createElement("div");
      row.className = "line src-" + line.source.replace(/[^a-z]/g, "");
      row.dataset.seq = String(line.seq);
      row.appendChild(span("ts", clock(line.timestamp_ms)));
      if (showSource) {
        row.appendChild(span("src", line.source));
      }
      row.appendChild(span("text", line.data));
      fragment.appendChild(row);
    });
    log.appendChild(fragment);
    while (log.childElementCount > MAX_LINES) {
      log.removeChild(log.firstElementChild);
    }
    if (empty) {
      empty.hidden = true;
    }
    log.classList.remove("empty");
    if (stick) {
      log.scrollTop = log.scrollHeight;
    }
  }

  function showState(data) {
    if (stateBadge && data.state) {
      var state = data.state.toLowerCase();
      stateBadge.textContent = state;
      stateBadge.className = "state state-" + state.replace(/[^a-z_]/g, "");
    }
    if (phase && typeof data.status_message === "string") {
      phase.textContent = data.status_message;
    }
  }

  function url() {
    var q = "tail=" + limit + "&after_seq=" + (isNaN(afterSeq) ? -1 : afterSeq);
    if (source) {
      q += "&source=" + encodeURIComponent(source);
    }
    return "/api/v1/jobs/" + encodeURIComponent(jobId) + "/logs?" + q;
  }

  function poll() {
    fetch(url(), { cache: "no-store", headers: { Accept: "application/json" } })
      .then(function (response) {
        if (response.status === 404) {
          return null; // the worker no longer keeps this job
        }
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.json();
      })
      .then(function (data) {
        if (data === null) {
          say("the worker no longer keeps this job", "done");
          log.dataset.follow = "done";
          return;
        }
        append(data.lines);
        if (data.last_seq !== null && data.last_seq !== undefined) {
          afterSeq = data.last_seq;
        }
        showState(data);
        var full = data.lines.length >= limit;
        if (data.terminal && !full) {
          // One more look: the last lines may land just after the final state.
          if (finalPolls-- > 0) {
            window.setTimeout(poll, RUNNING_MS);
            return;
          }
          say("job " + data.state.toLowerCase() + ": reload for the final figures", "done");
          log.dataset.follow = "done";
          return;
        }
        say("following live", "live");
        var wait = full ? 0 : (data.state === "PENDING" ? WAITING_MS : RUNNING_MS);
        window.setTimeout(poll, wait);
      })
      .catch(function (error) {
        say("follow interrupted (" + error.message + "), retrying", "warn");
        window.setTimeout(poll, RETRY_MS);
      });
  }

  log.scrollTop = log.scrollHeight;
  say("following live", "live");
  window.setTimeout(poll, RUNNING_MS);
})();
