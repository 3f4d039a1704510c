// The admin panel's one script. Pages name their part in <body data-page>.
// Everything the panel does goes through /panel/api with the session's CSRF token;
// an instance page follows its instance over server-sent events (no polling).
'use strict';

const csrf = document.querySelector('meta[name="csrf"]')?.content ?? '';

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { 'content-type': 'application/json', 'x-csrf-token': csrf },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) {
    location.assign('/panel/sign-in');
  }
  if (!response.ok) {
    throw new Error(data.error || `${response.status} ${response.statusText}`);
  }
  return data;
}

const $ = (id) => document.getElementById(id);

function show(element, visible) {
  element.hidden = !visible;
}

function say(element, message) {
  element.textContent = message ?? '';
  show(element, Boolean(message));
}

const STATES = {
  noSession: 'Not linked',
  linking: 'Linking',
  connected: 'Connected',
  reconnecting: 'Reconnecting',
  stopped: 'Stopped',
  sessionMissing: 'Session missing',
  unlinking: 'Unlinking',
};

function instancesPage() {
  const body = document.querySelector('#instances tbody');
  const error = $('list-error');
  let searching;

  async function load() {
    const query = $('search').value.trim();
    try {
      const list = await api('GET', `/panel/api/instances?query=${encodeURIComponent(query)}`);
      body.replaceChildren(...list.items.map(row));
      say(error, null);
    } catch (e) {
      say(error, e.message);
    }
  }

  function row(item) {
    const tr = document.createElement('tr');
    const name = document.createElement('a');
    name.href = `/panel/instances/${encodeURIComponent(item.id)}`;
    name.textContent = item.name;
    const cancel = document.createElement('button');
    cancel.type = 'button';
    cancel.className = 'danger';
    cancel.textContent = 'Cancel';
    cancel.addEventListener('click', async () => {
      const sure = confirm(
        `Cancel "${item.name}"? Its number will be unlinked from WhatsApp and the instance deleted.`,
      );
      if (!sure) return;
      try {
        await api('POST', `/panel/api/instances/${encodeURIComponent(item.id)}/cancel`);
        await load();
      } catch (e) {
        say(error, e.message);
      }
    });
    const cells = [name, item.phone ?? '—', STATES[item.state] ?? item.state ?? '—', item.created, cancel];
    for (const content of cells) {
      const td = document.createElement('td');
      td.append(content);
      tr.append(td);
    }
    tr.dataset.state = item.state ?? '';
    tr.dataset.id = item.id;
    return tr;
  }

  // States change live: one stream for every instance. The list is loaded once the
  // stream is open (and again at each reconnect), so no change falls in between.
  let reloading;
  const events = new EventSource('/panel/api/events');
  events.addEventListener('open', () => {
    document.body.dataset.live = 'yes';
    load();
  });
  events.addEventListener('instance', (event) => {
    const data = JSON.parse(event.data);
    const tr = [...body.rows].find((row) => row.dataset.id === data.id);
    if (!tr) {
      // A new instance: shown if the list shows everything (no search, not full).
      if (!$('search').value.trim() && body.rows.length < 100) {
        clearTimeout(reloading);
        reloading = setTimeout(load, 300);
      }
      return;
    }
    tr.dataset.state = data.state;
    tr.cells[2].textContent = STATES[data.state] ?? data.state;
    tr.cells[1].textContent = data.phone ?? tr.cells[1].textContent;
  });
  events.addEventListener('resync', () => load());

  $('search').addEventListener('input', () => {
    clearTimeout(searching);
    searching = setTimeout(load, 200);
  });
  $('create').addEventListener('submit', async (event) => {
    event.preventDefault();
    try {
      const created = await api('POST', '/panel/api/instances', { name: $('new-name').value });
      location.assign(`/panel/instances/${encodeURIComponent(created.id)}`);
    } catch (e) {
      say(error, e.message);
    }
  });
}

// The linking experience: a QR code with its countdown, each new one as WhatsApp sends
// it; after 3 codes nobody scanned, linking stops until asked again. Or a pairing code.
function linking(base, error) {
  const MAX_CODES = 3;
  // The distinct codes shown in this window (a reconnecting stream shows one again).
  let codes = new Set();
  let pairing = false;
  let stopped = false;
  let ticking;

  function countdown(seconds) {
    clearInterval(ticking);
    let left = seconds;
    const tick = () => {
      $('countdown').textContent = `WhatsApp replaces this code in ${left} s`;
      left = Math.max(0, left - 1);
    };
    tick();
    ticking = setInterval(tick, 1000);
  }

  function stopShowing() {
    clearInterval(ticking);
    if ($('sim-scan')) show($('sim-scan'), false);
    show($('qr'), false);
    $('countdown').textContent = '';
  }

  async function start() {
    codes = new Set();
    pairing = false;
    stopped = false;
    say(error, null);
    show($('stopped'), false);
    show($('start'), false);
    try {
      const answer = await api('POST', `${base}/qr-code`);
      // A link page joining a window opened elsewhere: its code came before it asked.
      if (answer?.image) showQr(answer);
    } catch (e) {
      say(error, e.message);
      show($('start'), true);
    }
  }

  async function stop() {
    if (stopped) return;
    stopped = true;
    stopShowing();
    show($('stopped'), true);
    show($('start'), true);
    $('start').textContent = 'Start again';
    try {
      await api('POST', `${base}/stop-linking`);
    } catch (e) {
      say(error, e.message);
    }
  }

  $('start').addEventListener('click', start);
  // The demo's simulated phone (sandbox builds running `zapgate demo`).
  for (const [button, action] of [['sim-scan', 'simulated-scan'], ['sim-code', 'simulated-code']]) {
    $(button)?.addEventListener('click', async () => {
      try {
        await api('POST', `${base}/${action}`);
      } catch (e) {
        say(error, e.message);
      }
    });
  }
  $('phone-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    say(error, null);
    try {
      const answer = await api('POST', `${base}/phone-code`, { phone: $('phone-input').value });
      showCode(answer.code);
    } catch (e) {
      say(error, e.message);
    }
  });

  // A pairing code takes over: its window stays open while it is valid, and the QR
  // codes that WhatsApp keeps sending meanwhile are neither shown nor counted.
  function showCode(code) {
    pairing = true;
    stopShowing();
    $('pair-code').textContent = code.length === 8 ? `${code.slice(0, 4)}-${code.slice(4)}` : code;
    show($('code-box'), true);
  }

  function showQr(data) {
    if (pairing || stopped) return;
    codes.add(data.value);
    if (codes.size > MAX_CODES) {
      stop();
      return;
    }
    if ($('sim-scan')) show($('sim-scan'), true);
    $('qr').src = data.image;
    $('qr').dataset.value = data.value;
    show($('qr'), true);
    show($('start'), false);
    show($('stopped'), false);
    countdown(data.expiresIn);
  }

  return {
    qr: showQr,
    pairingCode(data) {
      showCode(data.code);
    },
    state(data) {
      if (data.state !== 'linking') {
        stopShowing();
        pairing = false;
        show($('code-box'), false);
        if (stopped) return;
        show($('start'), true);
      }
    },
  };
}

function instancePage() {
  const id = document.body.dataset.instance;
  const base = `/panel/api/instances/${encodeURIComponent(id)}`;
  const error = $('error');
  const flow = linking(base, error);
  const curl = $('curl');
  curl.textContent = `curl ${location.origin}${curl.dataset.path}`;

  for (const button of document.querySelectorAll('[data-copy]')) {
    button.addEventListener('click', async () => {
      await navigator.clipboard?.writeText($(button.dataset.copy).textContent);
      button.textContent = 'Copied';
      setTimeout(() => (button.textContent = 'Copy'), 1500);
    });
  }
  $('restart').addEventListener('click', async () => {
    try {
      await api('POST', `${base}/restart`);
    } catch (e) {
      say(error, e.message);
    }
  });
  $('disconnect').addEventListener('click', async () => {
    if (!confirm('Disconnect this number? It is unlinked from WhatsApp and must be linked again.')) return;
    try {
      const answer = await api('POST', `${base}/disconnect`);
      say(error, answer.error ?? null);
    } catch (e) {
      say(error, e.message);
    }
  });

  $('make-link').addEventListener('click', async () => {
    try {
      const made = await api('POST', `${base}/link-page`);
      $('link-url').href = made.url;
      $('link-url').textContent = made.url;
      $('link-expiry').textContent = `Expires ${made.expiresAt}`;
      show($('link-made'), true);
    } catch (e) {
      say(error, e.message);
    }
  });
  $('revoke-links').addEventListener('click', async () => {
    if (!confirm('Revoke every link page of this instance? Their links stop working.')) return;
    try {
      const answer = await api('POST', `${base}/link-page/revoke`);
      show($('link-made'), false);
      say(error, null);
      $('link-expiry').textContent = `${answer.revoked} revoked`;
    } catch (e) {
      say(error, e.message);
    }
  });

  // The webhook deliveries, with a button to try a pending one now.
  async function deliveries() {
    try {
      const answer = await api('GET', `${base}/webhook-deliveries`);
      const rows = answer.deliveries.map((d) => {
        const tr = document.createElement('tr');
        tr.dataset.event = d.eventId;
        tr.dataset.status = d.status;
        const retry = document.createElement('button');
        retry.type = 'button';
        retry.textContent = 'Retry now';
        retry.hidden = d.status !== 'pending';
        retry.addEventListener('click', async () => {
          try {
            await api('POST', `${base}/webhook-deliveries/${encodeURIComponent(d.eventId)}/retry`);
          } catch (e) {
            // Settled meanwhile, say: the list, loaded again, shows where it stands.
            say(error, e.message);
          }
          setTimeout(deliveries, 500);
        });
        const answered = d.lastStatus ?? d.lastError ?? '—';
        for (const content of [d.type, d.status, String(d.attempts), String(answered), d.nextAttemptAt ?? '—', retry]) {
          const td = document.createElement('td');
          td.append(content);
          tr.append(td);
        }
        return tr;
      });
      document.querySelector('#deliveries tbody').replaceChildren(...rows);
      show($('deliveries'), true);
    } catch (e) {
      say(error, e.message);
    }
  }
  $('show-deliveries').addEventListener('click', deliveries);

  follow(base, flow, error, (data, linked) => {
    if (linked) {
      $('phone').textContent = data.phone ?? '—';
      $('device').textContent = data.device ?? '—';
      $('push-name').textContent = data.name ?? '—';
      $('since').textContent = data.linkedSince ?? '—';
    }
  });
}

// Follows an instance's events: its state, and the linking flow's codes.
function follow(base, flow, error, onState) {
  const events = new EventSource(`${base}/events`);
  events.addEventListener('state', (event) => {
    const data = JSON.parse(event.data);
    document.body.dataset.state = data.state;
    $('state').textContent = STATES[data.state] ?? data.state;
    const linked = data.connected || ['reconnecting', 'stopped', 'sessionMissing'].includes(data.state);
    show($('linked'), linked);
    show($('linking'), !linked);
    // What is wrong now, and nothing once it is not.
    const stale = ['reconnecting', 'stopped', 'sessionMissing'].includes(data.state);
    say(error, data.problem ?? (stale ? data.error : null));
    onState(data, linked);
    flow.state(data);
  });
  events.addEventListener('qr', (event) => flow.qr(JSON.parse(event.data)));
  events.addEventListener('pairing-code', (event) => flow.pairingCode(JSON.parse(event.data)));
  // The browser reconnects by itself; once it gives up (signed out, gone), say so.
  events.addEventListener('error', () => {
    if (events.readyState === EventSource.CLOSED) {
      say(error, 'Lost the connection to the gateway: reload the page.');
    }
  });
}

// The link page a business sends the number's owner: only the linking experience.
function linkPage() {
  const base = document.body.dataset.base;
  const error = $('error');
  const flow = linking(base, error);
  follow(base, flow, error, (data, linked) => {
    // The number shows only to the page it was linked through.
    if (linked) $('phone').textContent = data.phone ?? '';
    show($('phone-said'), linked && Boolean(data.phone));
  });
}

const pages = { instances: instancesPage, instance: instancePage, link: linkPage };
pages[document.body.dataset.page]?.();
