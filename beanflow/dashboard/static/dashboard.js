// The dashboard's only script: refresh the page's live sections ([data-live], by id) every few
// seconds while the tab is visible, and ask before a destructive action ([data-confirm]).
"use strict";

(function () {
  const period = Number(document.body.dataset.refresh || 5) * 1000;
  const toggle = document.getElementById("live");
  const stamp = document.getElementById("updated");
  if (toggle) {
    toggle.checked = localStorage.getItem("beanflow-live") !== "off";
    toggle.addEventListener("change", () => {
      localStorage.setItem("beanflow-live", toggle.checked ? "on" : "off");
    });
  }

  async function refresh() {
    if (document.hidden || (toggle && !toggle.checked)) return;
    if (!document.querySelector("[data-live]")) return;
    let response;
    try {
      response = await fetch(location.href, { headers: { "X-Beanflow-Refresh": "1" } });
    } catch (error) {
      if (stamp) stamp.textContent = "offline";
      return;
    }
    if (!response.ok) {
      if (stamp) stamp.textContent = "refresh failed: " + response.status;
      return;
    }
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const section of document.querySelectorAll("[data-live]")) {
      const replacement = fresh.getElementById(section.id);
      if (replacement) section.replaceWith(document.adoptNode(replacement));
    }
    if (stamp) stamp.textContent = "updated " + new Date().toLocaleTimeString();
  }

  setInterval(refresh, period);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });

  document.addEventListener("submit", (event) => {
    const button = event.submitter;
    const question = button && button.dataset.confirm;
    if (question && !window.confirm(question)) event.preventDefault();
  });
})();
