/* The dashboard's own few lines of JavaScript; htmx and its ws extension do the rest.
 *
 * - the live socket reconnects with the page's current position (after, since);
 * - live inbox rows are moved into place and filtered as the page's list is;
 * - a message the page already shows is replaced, never shown twice;
 * - relative times and the 24-hour window are refreshed each minute;
 * - the composer: Enter sends, Shift+Enter new line, counter, cleared on success;
 * - presence: this page's own name is not "also here", typing is said and fades;
 * - a styled confirmation dialog for hx-confirm, toasts, keyboard shortcuts.
 */
(function () {
  "use strict";

  var body = document.body;
  var me = body.dataset.userId || "";
  var conversationId = body.dataset.conversation || "";

  function $(sel, root) { return (root || document).querySelector(sel); }
  function $$(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }

  // ------------------------------------------------------------ the server's clock

  var cursor0 = $("#live-cursor");
  var clockOffset = 0; // server seconds minus this browser's
  if (cursor0 && cursor0.dataset.since) {
    clockOffset = parseFloat(cursor0.dataset.since) - Date.now() / 1000;
    if (!isFinite(clockOffset) || Math.abs(clockOffset) < 5) clockOffset = 0;
  }
  function serverNow() { return Date.now() / 1000 + clockOffset; }

  // ------------------------------------------------------------ the live socket

  function newestMessageId() {
    var list = conversationId && document.getElementById("messages-" + conversationId);
    var max = 0;
    if (list) {
      $$("[data-msg-id]", list).forEach(function (el) {
        var id = parseInt(el.dataset.msgId, 10);
        if (id > max) max = id;
      });
    }
    return max;
  }

  /* The ws extension reconnects with the URL it first read: bring `after` (the
   * newest message shown) and `since` (the last catch-up's server time) up to date,
   * so the consumer's catch-up sends exactly what this page missed. */
  function liveUrl(url) {
    var u = new URL(url, location.href);
    if (u.searchParams.get("conversation")) u.searchParams.set("after", String(newestMessageId()));
    var cursor = $("#live-cursor");
    if (cursor && cursor.dataset.since) u.searchParams.set("since", cursor.dataset.since);
    return u.toString();
  }

  if (window.htmx) {
    htmx.createWebSocket = function (url) {
      var socket = new WebSocket(liveUrl(url), []);
      socket.binaryType = htmx.config.wsBinaryType;
      return socket;
    };
  }

  function setLive(state, label) {
    var el = $("#live-status");
    if (!el) return;
    el.dataset.state = state;
    $(".live-label", el).textContent = label;
  }

  var failedConnects = 0;
  document.addEventListener("htmx:wsConnecting", function () { setLive("connecting", "Connecting…"); });
  document.addEventListener("htmx:wsOpen", function () { failedConnects = 0; setLive("live", "Live"); });
  document.addEventListener("htmx:wsClose", function (e) {
    var code = e.detail && e.detail.event ? e.detail.event.code : 0;
    if (code >= 4000 && code < 5000) { setLive("off", "Signed out · reload"); return; }
    setLive("offline", "Reconnecting…");
    // A socket refused again and again may be a session that expired: an htmx GET
    // then answers with the way to the login page (HX-Redirect).
    failedConnects += 1;
    if (failedConnects === 3 && $("#agent-state")) {
      htmx.ajax("GET", "/agent/state/", { target: "#agent-state", swap: "outerHTML" });
    }
    // The extension retries abnormal closes only; a server going away retries too.
    if ((code === 1000 || code === 1001 || code === 1005) && e.detail.socketWrapper) {
      setTimeout(function () { e.detail.socketWrapper.reconnect(); }, 1000 + Math.random() * 2000);
    }
  });

  document.addEventListener("htmx:wsAfterMessage", function () {
    absorbIncomingRows();
    var sync = $("#inbox-sync[data-refresh]");
    if (sync) {
      var when = sync.dataset.refresh;
      sync.removeAttribute("data-refresh");
      if (when === "quiet") refreshInboxWhenQuiet();
      else refreshInbox();
    }
  });

  /* A burst sends only its newest rows: reload the list once the rows stop coming
   * (or every BURST_REFRESH_MAX ms while a long burst goes on). */
  var QUIET_FOR = 2000, BURST_REFRESH_MAX = 10000;
  var quietTimer = null, behindSince = 0;
  function refreshInboxWhenQuiet() {
    clearTimeout(quietTimer);
    if (!behindSince) behindSince = Date.now();
    var wait = Math.max(0, Math.min(QUIET_FOR, behindSince + BURST_REFRESH_MAX - Date.now()));
    quietTimer = setTimeout(function () {
      behindSince = 0;
      refreshInbox();
    }, wait);
  }

  // ------------------------------------------------------------ messages

  function thread() { return conversationId ? document.getElementById("thread-" + conversationId) : null; }
  function nearBottom(el) { return el && el.scrollHeight - el.scrollTop - el.clientHeight < 120; }
  function scrollToBottom() { var t = thread(); if (t) t.scrollTop = t.scrollHeight; }

  var readTimer = null;
  function markReadSoon() {
    var header = conversationId && document.getElementById("conv-header-" + conversationId);
    if (!header || header.dataset.holder !== "me" || document.hidden) return;
    clearTimeout(readTimer);
    readTimer = setTimeout(function () {
      // Asked of the page, not of the header: a header swapped meanwhile (any live
      // change re-renders it) would make htmx drop the request.
      var now = document.getElementById("conv-header-" + conversationId);
      if (!now || now.dataset.holder !== "me") return;
      htmx.ajax("POST", "/c/" + conversationId + "/read/", { swap: "none", source: document.body });
    }, 800);
  }

  /* Keyboard users keep their place: when a header they were acting in is swapped,
   * focus goes to the composer (after a take over) or to the same button again. */
  var focusedAction = null;
  document.addEventListener("htmx:oobBeforeSwap", function (e) {
    var active = document.activeElement;
    var target = e.detail.target;
    focusedAction = target && active && target.contains(active) && active.dataset ? active.dataset.action || "" : null;
  });
  document.addEventListener("htmx:oobAfterSwap", function (e) {
    if (focusedAction === null) return;
    var action = focusedAction;
    focusedAction = null;
    var box = $("[data-composer] textarea");
    var again = action && $("[data-action='" + action + "']");
    if (/^take-over/.test(action) && box) box.focus();
    else if (again) again.focus();
    else if (box) box.focus();
  });

  document.addEventListener("htmx:oobBeforeSwap", function (e) {
    var target = e.detail.target;
    if (!target || !target.classList || !target.classList.contains("messages")) return;
    // A new line for the conversation: replace a bubble the page already shows
    // (catch-up and the live stream may both send it) instead of adding it twice.
    var fragment = e.detail.fragment;
    var stick = nearBottom(thread());
    var mine = false, fromCustomer = false;
    Array.prototype.slice.call(fragment.children || []).forEach(function (el) {
      if (!el.id) return;
      var existing = document.getElementById(el.id);
      if (existing) existing.replaceWith(el);
      else {
        if (el.dataset.author === "customer") fromCustomer = true;
        if (el.dataset.author === "human") mine = true;
      }
    });
    $$("[data-empty]", target).forEach(function (el) { el.remove(); });
    if (fromCustomer) markReadSoon();
    if (stick || mine) requestAnimationFrame(scrollToBottom);
  });

  // The failed bubble offers its text back to the composer.
  document.addEventListener("click", function (e) {
    var button = e.target.closest && e.target.closest("[data-retry]");
    if (!button) return;
    var bubble = button.closest(".msg");
    var text = bubble ? ($(".msg-text", bubble) || {}).textContent || "" : "";
    var box = document.getElementById("composer-text-" + button.dataset.retry);
    if (!box) { toast("Take the conversation over again to resend this message.", "warn"); return; }
    box.value = box.value ? box.value + "\n" + text : text;
    composerChanged(box);
    saveDraft(box);
    box.focus();
  });

  // ------------------------------------------------------------ the inbox

  /* Sorted as the server sorts: the queue ("Needs a human") longest wait first,
   * every other list newest activity first. */
  function rowKey(row) {
    var list = $("#inbox-list");
    if (list && list.dataset.filter === "needs") {
      return [-(parseFloat(row.dataset.waitingSince) || 0), -(parseInt(row.dataset.conv, 10) || 0)];
    }
    return [parseFloat(row.dataset.sort) || 0, parseInt(row.dataset.conv, 10) || 0];
  }
  function newer(a, b) { return a[0] !== b[0] ? a[0] > b[0] : a[1] > b[1]; }

  function digits(s) { return (s || "").replace(/\D/g, ""); }
  // As the server decides (selectors.PHONE_LIKE): "+34 600 11" is a phone number, "Ana2" is not.
  function phoneLike(s) { return /^[\d\s()+.\-]+$/.test(s); }

  function matchesFilter(row, list, wasListed) {
    var f = list.dataset.filter || "active";
    var active = row.dataset.state === "active";
    var ok;
    if (f === "needs") ok = active && row.dataset.needs === "1";
    else if (f === "mine") ok = !!me && row.dataset.heldBy === me;
    else if (f === "ended") ok = !active;
    else ok = active;
    var q = list.dataset.q || "";
    if (ok && q && !wasListed) {
      // The server also searched every message's text; here only what the row shows.
      var hay = row.dataset.search || "";
      ok = hay.indexOf(q) >= 0 || (phoneLike(q) && digits(q).length > 2 && digits(hay).indexOf(digits(q)) >= 0);
    }
    return ok;
  }

  /* Opening a conversation keeps the inbox's filter and search beside it. */
  function listQuery() {
    var list = $("#inbox-list");
    var query = list ? list.dataset.query : "";
    return query ? "?" + query : "";
  }

  function personalize(root) {
    var query = listQuery();
    $$(".back").forEach(function (a) { a.setAttribute("href", "/" + query); });
    $$(".row", root).concat(root.classList && root.classList.contains("row") ? [root] : []).forEach(function (row) {
      row.setAttribute("href", "/c/" + row.dataset.conv + "/" + query);
      row.classList.toggle("is-active", row.dataset.conv === conversationId);
      row.classList.toggle("is-mine", !!me && row.dataset.heldBy === me);
      var name = $(".holder-name", row);
      if (name) name.textContent = row.dataset.heldBy === me ? "You" : name.dataset.holderName;
      if (row.dataset.conv === conversationId) row.setAttribute("aria-current", "page");
    });
    refreshTimes(root);
  }

  function placeRow(row) {
    var list = $("#inbox-list");
    if (!list) return;
    var old = list.querySelector("#" + CSS.escape(row.id));
    // Rows come from several processes (the worker, each web process): one rendered
    // before the row shown here must not overwrite it, whatever order they arrive in.
    if (old && parseFloat(old.dataset.version) > parseFloat(row.dataset.version)) return;
    if (old) old.remove();
    if (!matchesFilter(row, list, !!old)) return;
    var key = rowKey(row);
    var before = null;
    var rows = $$(".row", list);
    for (var i = 0; i < rows.length; i++) {
      if (newer(key, rowKey(rows[i]))) { before = rows[i]; break; }
    }
    var more = $("#inbox-more", list);
    if (!before && more && !old) return; // it belongs to a page not loaded yet
    list.insertBefore(row, before || more || null);
    $$("[data-empty]", list).forEach(function (el) { el.remove(); });
    personalize(row);
    if (!old || old.dataset.sort !== row.dataset.sort) {
      row.classList.add("is-fresh");
      setTimeout(function () { row.classList.remove("is-fresh"); }, 1600);
    }
  }

  function absorbIncomingRows() {
    var box = $("#inbox-incoming");
    if (!box) return;
    Array.prototype.slice.call(box.children).forEach(function (row) {
      row.remove();
      if (row.classList.contains("row")) placeRow(row);
    });
  }

  /* A live refresh of the list and "Load more" take turns: a refresh landing while a
   * page is on its way would drop that page (its target is replaced), and a page landing
   * after a refresh that was asked for before it would be dropped by the refresh. */
  var STUCK_AFTER = 20000; // a request that never reported back no longer holds the other
  var inboxLoading = { refresh: 0, more: 0, refreshNext: false, moreNext: false };
  function busy(since) { return since && Date.now() - since < STUCK_AFTER; }

  function loadedPages(list) {
    var more = $("#inbox-more", list);
    if (more) return Math.max(1, (parseInt(more.dataset.nextPage, 10) || 2) - 1);
    var size = parseInt(list.dataset.pageSize, 10) || 1;
    return Math.max(1, Math.ceil($$(".row", list).length / size));
  }

  function inboxTurnEnded() {
    if (inboxLoading.moreNext && !busy(inboxLoading.refresh)) {
      inboxLoading.moreNext = false;
      var button = $("#inbox-more button");
      // Just swapped in: htmx wires it up only when the swap settles, so now, by hand.
      if (button) { htmx.process(button); button.click(); return; }
    }
    if (inboxLoading.refreshNext && !busy(inboxLoading.more)) {
      inboxLoading.refreshNext = false;
      refreshInbox();
    }
  }

  function refreshInbox() {
    var list = $("#inbox-list");
    if (!$("#inbox-body") || !list) return;
    if (busy(inboxLoading.more) || busy(inboxLoading.refresh)) { inboxLoading.refreshNext = true; return; }
    var url = new URL(location.href);
    var pages = loadedPages(list);
    if (pages > 1) url.searchParams.set("pages", pages);
    inboxLoading.refresh = Date.now();
    var done = function () { inboxLoading.refresh = 0; inboxTurnEnded(); };
    htmx.ajax("GET", url.pathname + url.search, { target: "#inbox-body", swap: "innerHTML" }).then(done, done);
  }

  document.addEventListener("htmx:beforeRequest", function (e) {
    if (!e.detail.target || e.detail.target.id !== "inbox-more") return;
    if (busy(inboxLoading.refresh)) {
      // Asked again once the refreshed list (with its own "Load more") is in.
      e.preventDefault();
      inboxLoading.moreNext = true;
      return;
    }
    inboxLoading.more = Date.now();
  });

  document.addEventListener("htmx:afterRequest", function (e) {
    if (!e.detail.target || e.detail.target.id !== "inbox-more" || !inboxLoading.more) return;
    inboxLoading.more = 0;
    inboxTurnEnded();
  });

  // "Load more" may bring a row that moved up meanwhile: keep the first one.
  function dedupeRows() {
    var seen = {};
    $$("#inbox-list .row").forEach(function (row) {
      if (seen[row.id]) row.remove();
      else seen[row.id] = true;
    });
  }

  document.addEventListener("htmx:afterSwap", function (e) {
    dedupeRows();
    if (e.detail.target && e.detail.target.id === "inbox-body") personalize(document.body);
  });

  // ------------------------------------------------------------ relative times

  function compact(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    if (seconds < 60) return "now";
    if (seconds < 3600) return Math.floor(seconds / 60) + "m";
    if (seconds < 86400) return Math.floor(seconds / 3600) + "h";
    return Math.floor(seconds / 86400) + "d";
  }
  function hoursMinutes(seconds) {
    var minutes = Math.floor(Math.max(0, seconds) / 60);
    var hours = Math.floor(minutes / 60);
    minutes = minutes % 60;
    return hours ? hours + "h " + (minutes < 10 ? "0" : "") + minutes + "m" : minutes + "m";
  }
  /* Keep in step with window_info() in dashboard/templatetags/ui.py. */
  function windowInfo(ts) {
    var elapsed = serverNow() - ts;
    var left = 86400 - elapsed;
    if (left <= 0) return { state: "closed", text: "Window closed" };
    if (left < 7200) return { state: "closing", text: hoursMinutes(left) + " left" };
    return { state: "open", text: "Customer " + compact(elapsed) + (elapsed < 60 ? "" : " ago") };
  }

  function refreshTimes(root) {
    $$("[data-ts][data-format]", root || document).forEach(function (el) {
      var ts = parseFloat(el.dataset.ts);
      if (!ts) return;
      if (el.dataset.format === "ago") {
        el.textContent = compact(serverNow() - ts);
      } else if (el.dataset.format === "window") {
        var w = windowInfo(ts);
        el.classList.remove("win-open", "win-closing", "win-closed");
        el.classList.add("win-" + w.state);
        var text = $(".win-text", el);
        if (text) text.textContent = w.text;
      }
    });
  }
  setInterval(function () { refreshTimes(document); }, 30000);

  /* "Pinecall" is true only while the worker's heartbeat is fresh: a worker that
   * died cannot say so, so the page notices its silence. */
  function checkHeartbeat() {
    var beat = $("#worker-heartbeat");
    var pill = $("#agent-state [data-worker-pill]");
    if (!beat || !beat.dataset.at) return;
    var stale = serverNow() - parseFloat(beat.dataset.at) > (parseFloat(beat.dataset.staleAfter) || 20);
    if (pill && stale && !pill.dataset.stale) {
      pill.dataset.stale = "1";
      pill.className = "pill pill-warn";
      pill.title = "The worker has not been heard from: actions wait in the outbox until it is back";
      pill.lastChild.textContent = "Pinecall offline";
    } else if (!stale && ($("#agent-state.is-offline") || (pill && pill.dataset.stale))) {
      // Heard from again: this user's banner, fresh.
      htmx.ajax("GET", "/agent/state/", { target: "#agent-state", swap: "outerHTML" });
    }
  }
  setInterval(checkHeartbeat, 5000);

  // ------------------------------------------------------------ the composer

  /* Characters as the server counts them (Python's len: code points). The
   * textarea's own maxlength would count UTF-16 units, an emoji as two. */
  function charCount(text) { return Array.from(text || "").length; }
  function composerMax(form) {
    var counter = form && $("[data-counter]", form);
    return (counter && parseInt(counter.dataset.max, 10)) || 4096;
  }

  function composerChanged(box) {
    var form = box.form;
    var counter = form && $("[data-counter]", form);
    var count = charCount(box.value);
    var max = composerMax(form);
    if (counter) {
      counter.textContent = count + " / " + max;
      counter.classList.toggle("is-near", count > max * 0.9);
      counter.classList.toggle("is-over", count > max);
    }
    var tooLong = form && $("[data-too-long]", form);
    if (tooLong && count <= max) tooLong.remove();
    box.style.height = "auto";
    box.style.height = Math.min(box.scrollHeight + 2, 220) + "px";
  }

  /* Drafts survive a reload, or the composer going away (someone took the
   * conversation over while you typed): kept per conversation for this tab. */
  function draftKey(box) { return "draft:" + box.id; }
  function saveDraft(box) {
    try {
      if (box.value) sessionStorage.setItem(draftKey(box), box.value);
      else sessionStorage.removeItem(draftKey(box));
    } catch (err) { /* storage full or disabled: nothing to keep */ }
  }
  function restoreDraft(box) {
    try {
      var draft = sessionStorage.getItem(draftKey(box));
      if (draft && !box.value) box.value = draft;
    } catch (err) { /* ignore */ }
  }

  document.addEventListener("input", function (e) {
    if (e.target.matches && e.target.matches("[data-composer] textarea")) {
      composerChanged(e.target);
      saveDraft(e.target);
    }
  });

  function isTyping(el) {
    return el && (el.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(el.tagName));
  }

  document.addEventListener("keydown", function (e) {
    var t = e.target;
    if (t.matches && t.matches("[data-composer] textarea") && e.key === "Enter" &&
        !e.shiftKey && !e.altKey && !e.ctrlKey && !e.metaKey && !e.isComposing) {
      e.preventDefault();
      // A composer swapped in a moment ago may not be wired by htmx yet.
      if (t.value.trim()) { htmx.process(t.form); htmx.trigger(t.form, "submit"); }
      return;
    }
    if (e.key === "/" && !isTyping(t) && !e.ctrlKey && !e.metaKey) {
      var search = $("#inbox-q");
      if (search && search.offsetParent !== null) { e.preventDefault(); search.focus(); search.select(); }
    }
    if (e.key === "Escape" && t.id === "inbox-q" && t.value) {
      t.value = "";
      htmx.trigger(t.form, "submit");
    }
  });

  /* Clearing the composer once a send is accepted. A state refresh can swap the
   * send form out while its request is in flight, and htmx's events for a
   * detached form never reach the document: so listen on the request itself. */
  /* Over the limit, nothing is sent: the text stays, with the reason beside it. */
  function refuseTooLong(form, text) {
    var count = charCount(text.trim());
    var max = composerMax(form);
    if (count <= max) return false;
    var note = $("[data-too-long]", form);
    if (!note) {
      note = document.createElement("p");
      note.className = "composer-error";
      note.setAttribute("role", "alert");
      note.setAttribute("data-too-long", "");
      form.insertBefore(note, form.firstChild);
    }
    note.textContent = "WhatsApp takes at most " + max + " characters (this has " + count + "): shorten it to send.";
    return true;
  }

  document.addEventListener("htmx:beforeRequest", function (e) {
    var form = e.detail.elt;
    if (!form.matches || !form.matches("[data-composer]")) return;
    var sent = ($("textarea", form) || {}).value || "";
    if (refuseTooLong(form, sent)) { e.preventDefault(); return; }
    var xhr = e.detail.xhr;
    xhr.addEventListener("load", function () {
      if (xhr.status < 200 || xhr.status >= 300) return; // the answer shows why; text kept
      var box = $("[data-composer] textarea");
      // Only what was sent: anything typed since stays.
      if (box && box.value.trim() === sent.trim()) box.value = "";
      if (box) { saveDraft(box); composerChanged(box); box.focus(); }
      requestAnimationFrame(scrollToBottom);
    });
  });

  document.addEventListener("htmx:afterRequest", function (e) {
    if (e.detail.failed && e.detail.xhr) {
      var text = e.detail.xhr.responseText || "";
      if (e.detail.xhr.status && text.indexOf("hx-swap-oob") < 0 && !e.detail.xhr.getResponseHeader("HX-Redirect")) {
        toast(e.detail.xhr.status === 403
          ? "The page's session expired or you are not allowed to do this. Reload the page."
          : "Something went wrong (" + e.detail.xhr.status + "). Try again, or reload the page.", "error");
      }
    }
  });
  document.addEventListener("htmx:sendError", function () {
    toast("Can't reach the server. Check your connection and try again.", "error");
  });

  // ------------------------------------------------------------ confirmations

  /* The button a confirmation was asked for, as the page shows it now: a live
   * update may have swapped the header while the dialog was open, and htmx
   * silently drops a request from an element that left the page. */
  function sameButtonNow(elt) {
    if (document.body.contains(elt)) return elt;
    var post = elt.getAttribute("hx-post");
    var action = elt.dataset.action;
    return $$("[hx-post]").filter(function (el) {
      return el.getAttribute("hx-post") === post && el.dataset.action === action && !el.disabled;
    })[0] || null;
  }

  document.addEventListener("htmx:confirm", function (e) {
    if (!e.detail.question) return;
    var elt = e.detail.elt;
    if (elt.dataset.confirmed) {
      // Already confirmed on the button this one replaced, for the same question.
      delete elt.dataset.confirmed;
      e.preventDefault();
      e.detail.issueRequest(true);
      return;
    }
    var dialog = $("#confirm-dialog");
    if (!dialog || !dialog.showModal) return; // the browser's confirm() then
    e.preventDefault();
    $("#confirm-text", dialog).textContent = e.detail.question;
    var label = (elt.dataset.confirmLabel || elt.textContent || "Confirm").trim();
    $("#confirm-title", dialog).textContent = label + "?";
    var ok = $("#confirm-ok", dialog);
    ok.textContent = label;
    ok.className = "btn " + (/danger|warn/.test(elt.className) ? "btn-danger" : "btn-primary");
    dialog.returnValue = "";
    dialog.addEventListener("close", function onClose() {
      dialog.removeEventListener("close", onClose);
      if (dialog.returnValue !== "ok") return;
      if (document.body.contains(elt)) { e.detail.issueRequest(true); return; }
      var now = sameButtonNow(elt);
      if (!now) {
        toast("The conversation changed while you were confirming, and nothing was done. Check it and try again.", "warn");
        return;
      }
      // The same question still applies: go ahead; a different one is asked again.
      if (now.getAttribute("hx-confirm") === e.detail.question) now.dataset.confirmed = "1";
      now.click();
    });
    dialog.showModal();
  });

  // ------------------------------------------------------------ toasts

  function toast(message, level) {
    var box = $("#toasts");
    if (!box) return;
    var el = document.createElement("div");
    el.className = "toast toast-" + (level || "info");
    el.setAttribute("role", level === "error" ? "alert" : "status");
    el.textContent = message;
    box.appendChild(el);
  }

  function armToast(el) {
    if (el.dataset.armed) return;
    el.dataset.armed = "1";
    var close = document.createElement("button");
    close.type = "button";
    close.className = "toast-close";
    close.setAttribute("aria-label", "Dismiss");
    close.textContent = "×";
    close.addEventListener("click", function () { el.remove(); });
    el.appendChild(close);
    var life = el.classList.contains("toast-error") ? 12000 : 5000;
    setTimeout(function () {
      el.classList.add("is-leaving");
      setTimeout(function () { el.remove(); }, 300);
    }, life);
  }

  var toastBox = $("#toasts");
  if (toastBox && window.MutationObserver) {
    new MutationObserver(function () { $$(".toast", toastBox).forEach(armToast); })
      .observe(toastBox, { childList: true });
  }

  // ------------------------------------------------------------ the handoff: alerts and clocks

  var baseTitle = document.title;
  var lastWaiting = null;

  function alertsWanted(kind) {
    var prefs = $("#alert-preferences");
    return !!(prefs && prefs.dataset[kind]);
  }

  /* A short two-tone chime, made here (no sound file). Browsers allow it after
   * the person has interacted with the page once. */
  var audio = null;
  function chime() {
    try {
      audio = audio || new (window.AudioContext || window.webkitAudioContext)();
      [660, 880].forEach(function (hz, i) {
        var osc = audio.createOscillator(), gain = audio.createGain();
        osc.frequency.value = hz;
        gain.gain.setValueAtTime(0.0001, audio.currentTime + i * 0.16);
        gain.gain.exponentialRampToValueAtTime(0.2, audio.currentTime + i * 0.16 + 0.02);
        gain.gain.exponentialRampToValueAtTime(0.0001, audio.currentTime + i * 0.16 + 0.15);
        osc.connect(gain).connect(audio.destination);
        osc.start(audio.currentTime + i * 0.16);
        osc.stop(audio.currentTime + i * 0.16 + 0.16);
      });
    } catch (err) { /* no audio here: the title and the badge still say it */ }
  }

  /* The favicon carries the waiting count, drawn on a canvas. */
  var plainIcon = null;
  function badgeIcon(count) {
    var link = document.querySelector("link[rel=icon]");
    if (!link) return;
    if (plainIcon === null) plainIcon = link.href;
    if (!count) { link.href = plainIcon; return; }
    var canvas = document.createElement("canvas");
    canvas.width = canvas.height = 32;
    var ctx = canvas.getContext("2d");
    ctx.fillStyle = "#4f46e5"; ctx.fillRect(0, 0, 32, 32);
    ctx.fillStyle = "#d92d20"; ctx.beginPath(); ctx.arc(22, 10, 10, 0, 2 * Math.PI); ctx.fill();
    ctx.fillStyle = "#fff"; ctx.font = "bold 14px sans-serif"; ctx.textAlign = "center"; ctx.textBaseline = "middle";
    ctx.fillText(count > 9 ? "9+" : String(count), 22, 11);
    link.href = canvas.toDataURL("image/png");
  }

  function desktopNotice(count) {
    if (!alertsWanted("desktop") || !window.Notification || Notification.permission !== "granted") return;
    var next = $("#inbox-list .row[data-needs='1']:not(.is-held)") || $(".row[data-needs='1']");
    var n = new Notification(count === 1 ? "A customer needs a person" : count + " customers need a person", {
      body: next ? (($(".row-name", next) || {}).textContent || "") : "",
      tag: "pinecall-needs-human",
    });
    n.onclick = function () { window.focus(); if (next) location.href = next.getAttribute("href"); n.close(); };
  }

  function countOf(id) {
    var el = document.getElementById(id);
    return el ? parseInt(el.dataset.count, 10) || 0 : null;
  }

  /* Callers who asked for a person raise the same alerts as customers who wait
   * (every page has the Calls tab's badge; only the inbox has the needs count). */
  var lastCallers = null;
  function callersChanged() {
    var count = countOf("calls-waiting");
    if (count === null) return;
    if (lastCallers !== null && count > lastCallers) {
      if (alertsWanted("sound")) chime();
      if (alertsWanted("desktop") && window.Notification && Notification.permission === "granted") {
        var row = $("#calls-live .call-row .call-needs-human");
        var link = row ? row.closest("a") : null;
        var n = new Notification(count === 1 ? "A caller asks for a person" : count + " callers ask for a person", {
          body: link ? (($(".call-caller", link) || {}).textContent || "") : "", tag: "pinecall-caller-needs-human",
        });
        n.onclick = function () { window.focus(); location.href = link ? link.getAttribute("href") : "/calls/"; n.close(); };
      }
    }
    lastCallers = count;
  }

  function waitingChanged() {
    callersChanged();
    var count = countOf("tab-count-needs");
    if (count === null) return;
    var callers = countOf("calls-waiting") || 0;
    var wantTitle = alertsWanted("title");
    document.title = wantTitle && count + callers ? "(" + (count + callers) + ") Needs a human · " + baseTitle : baseTitle;
    badgeIcon(wantTitle ? count + callers : 0);
    if (lastWaiting !== null && count > lastWaiting) {
      if (alertsWanted("sound")) chime();
      desktopNotice(count);
    }
    lastWaiting = count;
    var next = $("[data-action=take-next]");
    if (next) next.disabled = !count;
  }

  // Desktop notifications need the person's yes, asked on their click.
  document.addEventListener("change", function (e) {
    if (e.target.matches && e.target.matches("[data-ask-notification]") && e.target.checked &&
        window.Notification && Notification.permission === "default") {
      Notification.requestPermission();
    }
  });

  /* The holder's countdown: shown in the last five minutes before the AI takes it back. */
  var COUNTDOWN_FROM = 300;
  function tickCountdown() {
    $$("[data-idle-deadline]").forEach(function (el) {
      var left = Math.floor(parseFloat(el.dataset.idleDeadline) - serverNow());
      var show = left <= COUNTDOWN_FROM;
      el.hidden = !show;
      if (!show) return;
      var out = $("[data-countdown]", el);
      if (out) out.textContent = left <= 0 ? "a moment" : Math.floor(left / 60) + ":" + ("0" + (left % 60)).slice(-2);
    });
  }
  setInterval(tickCountdown, 1000);

  document.addEventListener("keydown", function (e) {
    if (e.key === "n" && !isTyping(e.target) && !e.ctrlKey && !e.metaKey && !e.altKey) {
      var next = $("[data-action=take-next]");
      if (next && !next.disabled) { e.preventDefault(); next.click(); }
    }
  });

  // ------------------------------------------------------------ voice calls

  /* A call's duration ticks every second from its start (the server's clock). */
  function callDurations() {
    $$("[data-ts][data-format='duration']").forEach(function (el) {
      var seconds = Math.max(0, Math.floor(serverNow() - parseFloat(el.dataset.ts)));
      var m = Math.floor(seconds / 60), s = seconds % 60;
      el.textContent = m + ":" + (s < 10 ? "0" : "") + s;
    });
  }
  setInterval(callDurations, 1000);

  /* A typed line queued: the field is ready for the next one. */
  document.addEventListener("htmx:afterRequest", function (e) {
    var form = e.detail.elt;
    if (form && form.matches && form.matches("form.call-say, form.call-forward") && e.detail.successful) form.reset();
  });

  /* The call list: a row moves between "live" and "ended", never shown twice. */
  document.addEventListener("htmx:oobBeforeSwap", function (e) {
    var target = e.detail.target;
    if (!target || !target.classList || !target.classList.contains("call-list")) return;
    Array.prototype.slice.call(e.detail.fragment.children || []).forEach(function (el) {
      var existing = el.id && document.getElementById(el.id);
      if (existing) existing.remove();
    });
    $$("[data-empty]", target).forEach(function (el) { el.remove(); });
  });

  /* A call's page: its lines scroll between the header and the actions and follow
   * the newest (a caption growing, a line made final) unless the person scrolled up
   * to read. A replaced line fires its htmx event off the page, so the lines
   * themselves are watched. */
  (function followCallLines() {
    var lines = $("#call-lines");
    if (!lines || !window.MutationObserver) return;
    var pinned = true;
    lines.scrollTop = lines.scrollHeight;
    lines.addEventListener("scroll", function () { pinned = nearBottom(lines); });
    function follow() { if (pinned) lines.scrollTop = lines.scrollHeight; }
    new MutationObserver(follow).observe(lines, { childList: true, subtree: true, characterData: true });
    // The header growing (on hold, muted) shrinks the lines' box without touching them.
    if (window.ResizeObserver) new ResizeObserver(follow).observe(lines);
  })();

  // ------------------------------------------------------------ presence

  /* The presence bar lists everyone who has the conversation open (one fragment
   * for all of them): this page leaves its own operator out. */
  function showPresence(root) {
    $$(".presence", root).concat(root.classList && root.classList.contains("presence") ? [root] : []).forEach(function (bar) {
      var others = 0;
      $$("[data-user]", bar).forEach(function (person) {
        person.hidden = person.dataset.user === me;
        if (!person.hidden) others += 1;
      });
      bar.dataset.others = String(others);
    });
    // An inbox row's "open now" mark says nothing when the only one there is you.
    $$(".row-viewing", root).concat(root.classList && root.classList.contains("row-viewing") ? [root] : []).forEach(function (mark) {
      var ids = (mark.dataset.viewers || "").split(" ").filter(Boolean);
      mark.hidden = ids.length === 0 || (ids.length === 1 && ids[0] === me);
    });
  }

  /* "X is typing…" fades by itself; the typist's own page never shows it. */
  var typingTimer = null;
  function typingArrived(root) {
    var line = root.id && /^typing-/.test(root.id) ? root : $(".typing", root);
    if (!line || !line.dataset.user) return;
    clearTimeout(typingTimer);
    if (line.dataset.user === me) { line.dataset.typingDone = "1"; return; }
    delete line.dataset.typingDone;
    var seconds = parseFloat(line.dataset.typingFor) || 6;
    typingTimer = setTimeout(function () { line.dataset.typingDone = "1"; }, seconds * 1000);
  }

  var liveSocket = null;
  var typingSaidAt = 0;
  document.addEventListener("htmx:wsOpen", function (e) { liveSocket = e.detail.socketWrapper || null; });
  document.addEventListener("htmx:wsClose", function () { liveSocket = null; });
  document.addEventListener("input", function (e) {
    if (!liveSocket || !e.target.matches || !e.target.matches("[data-composer] textarea")) return;
    if (!e.target.value.trim() || Date.now() - typingSaidAt < 3000) return;
    typingSaidAt = Date.now();
    try { liveSocket.send(JSON.stringify({ typing: true })); } catch (err) { /* reconnecting */ }
  });

  // ------------------------------------------------------------ on every new piece of page

  if (window.htmx) {
    htmx.onLoad(function (root) {
      personalize(root);
      showPresence(root);
      typingArrived(root);
      waitingChanged();
      tickCountdown();
      callDurations();
      $$("[data-composer] textarea", root).forEach(function (box) {
        restoreDraft(box);
        composerChanged(box);
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    scrollToBottom();
    var active = conversationId && document.getElementById("row-" + conversationId);
    if (active && active.scrollIntoView) active.scrollIntoView({ block: "nearest" });
  });
  // ------------------------------------------------------------ operator tools: canned replies, notes, contact panel

  /* "/" and a few letters at the start of a word open the canned-reply picker. The
   * server fills the reply for this customer and operator; Enter or Tab inserts it
   * (as text) for editing: the picker never sends. Usage is counted on insertion. */
  var picker = null; // { box, list, start, end, timer, seq }

  function slashQuery(box) {
    var upto = box.value.slice(0, box.selectionStart);
    var m = /(^|\s)\/([\w-]{0,40})$/.exec(upto);
    if (!m) return null;
    return { query: m[2], start: upto.length - m[2].length - 1, end: box.selectionStart };
  }
  function pickerOptions() { return picker ? $$("[role=option][data-canned-id]", picker.list) : []; }
  function closePicker() {
    if (!picker) return;
    clearTimeout(picker.timer);
    picker.list.hidden = true;
    picker.list.textContent = "";
    picker.box.setAttribute("aria-expanded", "false");
    picker.box.removeAttribute("aria-activedescendant");
    picker = null;
  }
  function pickerIndex() {
    var options = pickerOptions();
    for (var i = 0; i < options.length; i++) if (options[i].getAttribute("aria-selected") === "true") return i;
    return 0;
  }
  function pickerSelect(index) {
    var options = pickerOptions();
    if (!options.length) return;
    index = (index + options.length) % options.length;
    options.forEach(function (o, i) { o.setAttribute("aria-selected", i === index ? "true" : "false"); });
    picker.box.setAttribute("aria-activedescendant", options[index].id);
    if (options[index].scrollIntoView) options[index].scrollIntoView({ block: "nearest" });
  }
  function pickerInsert(option) {
    var box = picker.box;
    var at = slashQuery(box) || picker; // the "/word" as it is now
    var text = option.dataset.filled || "";
    box.value = box.value.slice(0, at.start) + text + box.value.slice(at.end);
    var caret = at.start + text.length;
    closePicker();
    box.focus();
    box.setSelectionRange(caret, caret);
    composerChanged(box);
    saveDraft(box);
    htmx.ajax("POST", option.dataset.usedUrl, { swap: "none", source: document.body });
  }
  function pickerRefresh(box) {
    var at = slashQuery(box);
    var list = box.form && $("[data-canned-picker]", box.form);
    if (!at || !list) { closePicker(); return; }
    // A live swap of the composer keeps the textarea (hx-preserve) but not the list.
    if (!picker || picker.box !== box || picker.list !== list) { closePicker(); picker = { box: box, list: list, seq: 0 }; }
    var state = picker;
    state.start = at.start; state.end = at.end;
    clearTimeout(state.timer);
    state.timer = setTimeout(function () {
      var seq = ++state.seq;
      fetch(list.dataset.url + "?q=" + encodeURIComponent(at.query), {
        credentials: "same-origin", headers: { "HX-Request": "true" },
      }).then(function (r) { return r.ok ? r.text() : ""; }).then(function (html) {
        if (picker !== state || seq !== state.seq || !html) return;
        list.innerHTML = html; // rendered and escaped by the server; no scripts, no hx- attributes
        list.hidden = false;
        box.setAttribute("aria-expanded", "true");
        pickerSelect(0);
      }).catch(function () { /* offline: no picker, the text stays */ });
    }, 120);
  }

  document.addEventListener("input", function (e) {
    if (e.target.matches && e.target.matches("[data-composer] textarea")) pickerRefresh(e.target);
  });
  // Capture phase: ahead of the composer's own Enter-sends handler.
  document.addEventListener("keydown", function (e) {
    if (!picker || e.target !== picker.box || e.isComposing) return;
    var handled = true;
    if (e.key === "ArrowDown") pickerSelect(pickerIndex() + 1);
    else if (e.key === "ArrowUp") pickerSelect(pickerIndex() - 1);
    else if (e.key === "Escape") closePicker();
    else if ((e.key === "Enter" && !e.shiftKey) || e.key === "Tab") {
      var option = pickerOptions()[pickerIndex()];
      if (option) pickerInsert(option);
      else closePicker(); // nothing matched: Enter closes the picker, it does not send "/word"
    } else handled = false;
    if (handled) { e.preventDefault(); e.stopImmediatePropagation(); }
  }, true);
  document.addEventListener("mousedown", function (e) {
    var option = picker && e.target.closest && e.target.closest("[data-canned-picker] [data-canned-id]");
    if (option) { e.preventDefault(); pickerInsert(option); }
  });
  document.addEventListener("focusout", function (e) {
    if (picker && e.target === picker.box) setTimeout(function () { if (picker && document.activeElement !== picker.box) closePicker(); }, 150);
  });

  /* Reply or internal note: the tab's mode sits on the conversation pane, which
   * live swaps of the composer leave alone. */
  function composeMode(mode, focus) {
    var pane = $(".conv-pane[data-compose-mode]");
    if (!pane) return;
    pane.dataset.composeMode = mode;
    $$("[data-compose-tab]", pane).forEach(function (tab) {
      tab.setAttribute("aria-selected", tab.dataset.composeTab === mode ? "true" : "false");
    });
    closePicker();
    var box = mode === "note" ? $("[data-note-composer] textarea", pane) : $("[data-composer] textarea", pane);
    if (focus && box) box.focus();
  }
  document.addEventListener("click", function (e) {
    var tab = e.target.closest && e.target.closest("[data-compose-tab]");
    if (tab) composeMode(tab.dataset.composeTab, true);
    var toggle = e.target.closest && e.target.closest("[data-contact-toggle]");
    if (toggle) contactDrawer(body.dataset.contactDrawer !== "open");
  });
  /* Below 1200 px the contact panel is a drawer over the conversation. */
  function contactDrawer(open) {
    body.dataset.contactDrawer = open ? "open" : "";
    $$("[data-contact-toggle]").forEach(function (b) { b.setAttribute("aria-expanded", open ? "true" : "false"); });
    var panel = $("aside[data-contact-panel]");
    if (open && panel) panel.focus();
    else if (!open && $(".contact-toggle")) $(".contact-toggle").focus();
  }
  document.addEventListener("keydown", function (e) {
    var t = e.target;
    if (t.matches && t.matches("[data-note-composer] textarea") && e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      if (t.value.trim()) { htmx.process(t.form); htmx.trigger(t.form, "submit"); }
    }
    if (e.key === "Escape" && body.dataset.contactDrawer === "open") contactDrawer(false);
  });
  document.addEventListener("htmx:afterRequest", function (e) {
    var form = e.detail.elt;
    if (form && form.matches && form.matches("[data-note-composer]") && e.detail.successful) {
      form.reset();
      requestAnimationFrame(scrollToBottom);
    }
  });

  /* A mention reaches only the mentioned person's sockets as a toast; it rings and
   * notifies as their alert settings say, like a customer waiting. */
  function mentionArrived(el) {
    if (el.dataset.alerted) return;
    el.dataset.alerted = "1";
    if (alertsWanted("sound")) chime();
    if (alertsWanted("desktop") && window.Notification && Notification.permission === "granted") {
      var n = new Notification((el.dataset.by || "A colleague") + " mentioned you", {
        body: el.dataset.excerpt || "", tag: "pinecall-mention-" + (el.dataset.conversation || ""),
      });
      n.onclick = function () { window.focus(); if (el.dataset.href) location.href = el.dataset.href; n.close(); };
    }
  }
  if (toastBox && window.MutationObserver) {
    new MutationObserver(function () { $$("[data-notice=mention]", toastBox).forEach(mentionArrived); })
      .observe(toastBox, { childList: true });
  }
})();
