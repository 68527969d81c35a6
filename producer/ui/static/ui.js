// mmq results page: the little JavaScript it has. Every page works without it
// (a meta refresh keeps pending jobs moving, the file input takes files).
(function () {
  "use strict";

  // The job list: its pending jobs' statuses arrive as Server-Sent Events, one
  // "row" event (the job's rendered table row) per change; the server ends the stream
  // ("end") once every one of them has finished. Without scripts, a meta refresh.
  function liveRows(tbody) {
    var source = new EventSource(tbody.dataset.events);
    source.addEventListener("row", function (e) {
      var tpl = document.createElement("template");
      tpl.innerHTML = "<table><tbody>" + e.data + "</tbody></table>";
      var row = tpl.content.querySelector("tr");
      var old = row && row.id ? document.getElementById(row.id) : null;
      // A finished row (and an <audio> someone plays in it) is only replaced by news.
      if (old && old.parentNode === tbody && old.dataset.status !== row.dataset.status) {
        tbody.replaceChild(row, old);
      }
      tbody.dataset.eventsSeen = (parseInt(tbody.dataset.eventsSeen, 10) || 0) + 1;  // tests watch it
    });
    source.addEventListener("end", function () { source.close(); tbody.dataset.live = "done"; });
    source.addEventListener("timeout", function () { source.close(); liveRows(tbody); });
    source.onerror = function () {
      // Closed for good (a 401 once signed out): the reload goes to the sign-in page.
      // Otherwise EventSource reconnects by itself (the API restarting).
      if (source.readyState === EventSource.CLOSED) window.location.reload();
    };
  }

  // A pending job's own page: reload as soon as its status changes.
  function liveJob(card) {
    var source = new EventSource(card.dataset.events);
    source.addEventListener("row", function (e) {
      var m = /data-status="([a-z]+)"/.exec(e.data);
      if (m && m[1] !== card.dataset.status) { source.close(); window.location.reload(); }
    });
    source.addEventListener("end", function () { source.close(); });
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
    var live = window.EventSource !== undefined;
    var rows = document.getElementById("jobs-rows");
    if (rows && rows.dataset.events && live) liveRows(rows);
    var card = document.getElementById("job");
    if (card && card.dataset.events && live) liveJob(card);
    var ms = parseInt(document.body.dataset.reloadAfter, 10);
    if (ms > 0 && !(card && card.dataset.events && live)) reloadLater(ms);
    var zone = document.getElementById("dropzone");
    if (zone) dropZone(zone);
  });
})();
