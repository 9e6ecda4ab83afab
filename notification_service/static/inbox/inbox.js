// The demo inbox: the reference client of the inbox API and of GET /stream.
//
// Opened as /inbox?user_id=<id> (a service without API keys) or /inbox?token=<token>
// (a user token, minted by your backend or POST /token; #token= works too and is never
// sent to a server). Every text that comes from a notification is set with textContent,
// never as HTML, and the page's Content-Security-Policy runs no inline script anyway.
"use strict";

const query = new URLSearchParams(location.search);
const fragment = new URLSearchParams(location.hash.slice(1));
const token = fragment.get("token") || query.get("token");
const userId = token ? tokenUser(token) : query.get("user_id");

const list = document.getElementById("list");
const badge = document.getElementById("badge");
const status = document.getElementById("status");
// The counts the list on screen reflects: a `counts` event that differs means another
// tab or process changed the inbox, and the list is read again.
let shown = null;

// A token is base64url(JSON {sub, exp}) "." signature: its first part is readable.
function tokenUser(token) {
  try {
    const part = token.split(".")[0].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part)).sub;
  } catch {
    return null;
  }
}

// One API call: GET with a query string, POST or PUT with a JSON body; the token (if any)
// in the Authorization header. Answers `data`, or throws the error's code and message.
async function call(method, route, fields) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const init = { method, headers };
  let url = route;
  if (method === "GET") {
    url += "?" + new URLSearchParams(fields);
  } else {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(fields);
  }
  const answer = await (await fetch(url, init)).json();
  if (!answer.success) {
    throw new Error(`${answer.error.code}: ${answer.error.message}`);
  }
  return answer.data;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  node.className = className;
  node.textContent = text; // text, never HTML
  return node;
}

function item(notification) {
  const { id, key, timestamp, is_new: isNew, data } = notification;
  const count = notification.count || 1;
  const li = document.createElement("li");
  li.dataset.id = id;
  li.dataset.count = count;
  li.classList.toggle("unread", isNew);
  const title = typeof data.title === "string" ? data.title : key;
  const when = new Date(timestamp * 1000).toLocaleString();
  const heading = element("span", "title", title);
  if (count > 1) {
    // A collapsed notification: one row for `count` events of one thread.
    heading.append(" ", element("span", "count", `×${count}`));
  }
  li.append(
    heading,
    element("span", "meta", `${key} · ${when}`),
    element("code", "data", JSON.stringify(data)),
    element("button", "delete", "Delete"),
  );
  return li;
}

function showCounts(counts) {
  badge.textContent = counts.new;
  badge.hidden = counts.new === 0;
}

function report(message, isError = false) {
  status.textContent = message;
  status.classList.toggle("error", isError);
}

// The newest 50, and the counts they go with.
async function refresh() {
  const page = await call("GET", "list", { user_id: userId, limit: 50 });
  list.replaceChildren(...page.list.map(item));
  shown = { elements: page.elements, new: page.new };
  showCounts(page);
}

// After one of this page's own changes: the answer's counts are what the list shows.
function changed(counts) {
  shown = { elements: counts.elements, new: counts.new };
  showCounts(counts);
}

function follow() {
  const url = new URL("stream", document.baseURI);
  url.searchParams.set("user_id", userId);
  if (token) url.searchParams.set("token", token); // EventSource cannot send headers
  const events = new EventSource(url);
  events.addEventListener("notification", (event) => {
    const notification = JSON.parse(event.data);
    if (!shown) return;
    const known = [...list.children].find((li) => li.dataset.id === notification.id);
    if (known) {
      // Sent again: a collapse updated it (same id, a higher count, new data) and moved
      // it to the top. The counts did not change; a `counts` event follows if they did.
      if (Number(known.dataset.count) !== (notification.count || 1)) {
        known.remove();
        list.prepend(item(notification));
      }
      return;
    }
    list.prepend(item(notification));
    shown.elements += 1;
    shown.new += notification.is_new ? 1 : 0;
  });
  events.addEventListener("counts", (event) => {
    const counts = JSON.parse(event.data);
    // New counts come with the list they count (refresh shows both at once): a badge
    // ahead of its list would say 2 unread beside 3 marked unread.
    if (!shown || counts.elements !== shown.elements || counts.new !== shown.new) {
      refresh().catch((error) => report(error.message, true));
    } else {
      showCounts(counts);
    }
  });
  events.onopen = () => report("Live: new notifications appear at the top.");
  events.onerror = () => {
    const closed = events.readyState === EventSource.CLOSED;
    // A closed stream was refused (an expired token, an unknown user): reload to retry.
    report(closed ? "Disconnected: reload the page (with a new token)." : "Reconnecting…", closed);
  };
}

list.addEventListener("click", async (event) => {
  const li = event.target.closest("li");
  if (!li) return;
  const fields = { user_id: userId, notification_id: li.dataset.id };
  try {
    if (event.target.closest(".delete")) {
      changed(await call("POST", "delete", fields));
      li.remove();
    } else if (li.classList.contains("unread")) {
      changed(await call("POST", "read", fields));
      li.classList.remove("unread");
    }
  } catch (error) {
    report(error.message, true);
  }
});

document.getElementById("mark-all").addEventListener("click", async () => {
  // Up to the newest one on screen: one that arrives meanwhile stays unread.
  const newest = list.firstElementChild?.dataset.id;
  try {
    changed(await call("POST", "read-all", { user_id: userId, up_to: newest }));
    for (const li of list.children) li.classList.remove("unread");
  } catch (error) {
    report(error.message, true);
  }
});

// The preferences panel: read when first opened; each toggle saves at once.
const prefs = document.getElementById("prefs");
const CHANNELS = ["in_app", "email"];

function toggle(key, channel, setting, mandatory) {
  const cell = document.createElement("td");
  if (setting === undefined) {
    cell.textContent = "—"; // the kind does not use this channel
    return cell;
  }
  const box = document.createElement("input");
  box.type = "checkbox";
  box.checked = setting;
  box.disabled = mandatory;
  box.dataset.key = key;
  box.dataset.channel = channel;
  box.setAttribute("aria-label", `${key}: ${channel === "in_app" ? "in the inbox" : "by email"}`);
  cell.append(box);
  return cell;
}

function showPreferences(data) {
  const rows = Object.entries(data.keys).map(([key, setting]) => {
    const row = document.createElement("tr");
    const name = element("th", "", key);
    if (setting.mandatory) name.append(" ", element("span", "mandatory", "mandatory"));
    row.append(name, ...CHANNELS.map((c) => toggle(key, c, setting[c], setting.mandatory)));
    return row;
  });
  prefs.querySelector("tbody").replaceChildren(...rows);
}

prefs.addEventListener("toggle", () => {
  if (!prefs.open || prefs.dataset.loaded) return;
  call("GET", "preferences", { user_id: userId })
    .then((data) => {
      prefs.dataset.loaded = "yes";
      showPreferences(data);
    })
    .catch((error) => report(error.message, true));
});

prefs.addEventListener("change", async (event) => {
  const box = event.target;
  if (!box.dataset.key) return;
  const change = { [box.dataset.key]: { [box.dataset.channel]: box.checked } };
  try {
    showPreferences(await call("PUT", "preferences", { user_id: userId, keys: change }));
    report(`Saved: ${box.dataset.key} ${box.checked ? "on" : "off"}.`);
  } catch (error) {
    box.checked = !box.checked;
    report(error.message, true);
  }
});

if (userId) {
  // The stream first, then the list: nothing made in between is missed.
  follow();
  refresh().catch((error) => report(error.message, true));
} else {
  report("Open this page as /inbox?user_id=<id>, or /inbox?token=<user token>.", true);
}
