// mmq results page: the little JavaScript it has. Every page works without it
// (a meta refresh keeps pending jobs moving, the file input takes files).
(function () {
  "use strict";

  // The job list: re-read its rows every few seconds while the tab is visible, so
  // statuses and results appear without reloading the page.
  function pollRows(tbody) {
    var every = parseInt(tbody.dataset.every, 10) || 2000;
    var busy = false;
    setInterval(function () {
      if (busy || document.hidden) return;
      busy = true;
      fetch(tbody.dataset.poll, {credentials: "same-origin", headers: {"Accept": "text/html"}})
        .then(function (r) {
          if (r.status === 401) { window.location.reload(); return null; }  // signed out
          return r.ok ? r.text() : null;
        })
        .then(function (html) {
          if (html === null) return;
          merge(tbody, html);
          tbody.dataset.polls = (parseInt(tbody.dataset.polls, 10) || 0) + 1;  // tests watch it
        })
        .catch(function () { /* the API restarting: try again next time */ })
        .then(function () { busy = false; });
    }, every);
  }

  // Put the fresh rows in place, touching only rows that are new or whose status
  // changed: a finished job's row (and an <audio> someone is playing in it) stays as
  // it is. A job's place in the list never changes (newest first), so new rows go
  // in at their index and rows pushed off the page are dropped.
  function merge(tbody, html) {
    var tpl = document.createElement("template");
    tpl.innerHTML = "<table><tbody>" + html + "</tbody></table>";
    var fresh = Array.prototype.slice.call(tpl.content.querySelector("tbody").children);
    var ids = {};
    fresh.forEach(function (row) { if (row.id) ids[row.id] = true; });
    Array.prototype.slice.call(tbody.children).forEach(function (row) {
      if (!row.id || !ids[row.id]) tbody.removeChild(row);
    });
    fresh.forEach(function (row, i) {
      var old = row.id ? document.getElementById(row.id) : null;
      if (old && old.parentNode === tbody) {
        if (old.dataset.status !== row.dataset.status) tbody.replaceChild(row, old);
      } else {
        tbody.insertBefore(row, tbody.children[i] || null);
      }
    });
  }

  // A pending job's own page reloads until the job has finished.
  function reloadLater(ms) {
    setTimeout(function () { if (!document.hidden) window.location.reload(); else reloadLater(ms); }, ms);
  }

  // The submit form: files dropped anywhere on the zone go into its file input.
  function dropZone(zone) {
    var input = zone.querySelector("input[type=file]");
    var list = zone.querySelector(".dropped");
    function show() {
      list.textContent = "";
      Array.prototype.forEach.call(input.files, function (f) {
        var li = document.createElement("li");
        li.textContent = f.name + " (" + Math.ceil(f.size / 1024) + " KiB)";
        list.appendChild(li);
      });
    }
    ["dragenter", "dragover"].forEach(function (type) {
      zone.addEventListener(type, function (e) { e.preventDefault(); zone.classList.add("over"); });
    });
    ["dragleave", "drop"].forEach(function (type) {
      zone.addEventListener(type, function () { zone.classList.remove("over"); });
    });
    zone.addEventListener("drop", function (e) {
      e.preventDefault();
      if (e.dataTransfer && e.dataTransfer.files.length) {
        input.files = e.dataTransfer.files;
        show();
      }
    });
    input.addEventListener("change", show);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var rows = document.querySelector("[data-poll]");
    if (rows) pollRows(rows);
    var ms = parseInt(document.body.dataset.reloadAfter, 10);
    if (ms > 0) reloadLater(ms);
    var zone = document.getElementById("dropzone");
    if (zone) dropZone(zone);
  });
})();
