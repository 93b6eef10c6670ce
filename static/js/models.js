// The model picker's data: categories from /api/models/categories, or one "Models" group from
// /api/models when the gateway has no categories endpoint.

import { apiFetch } from "./auth.js";

/** {groups: [{label, models: [model]}], models: Map(id -> model), note} */
export async function loadCatalogue() {
  const response = await apiFetch("api/models/categories", { headers: { accept: "application/json" } });
  if (response.ok) return fromCategories(await response.json());
  if (response.status !== 404) throw new Error(`the model list failed (HTTP ${response.status})`);
  const plain = await apiFetch("api/models", { headers: { accept: "application/json" } });
  if (!plain.ok) throw new Error(`the model list failed (HTTP ${plain.status})`);
  return fromList(await plain.json());
}

function asText(value) {
  return typeof value === "string" ? value : null;
}

function fromCategories(body) {
  const models = new Map();
  for (const m of Array.isArray(body.models) ? body.models : []) {
    const id = asText(m?.id);
    if (!id) continue;
    models.set(id, {
      id,
      provider: asText(m.provider),
      display_name: asText(m.display_name),
      family: asText(m.family),
      tier: asText(m.tier),
      context_window: Number.isFinite(m.context_window) ? m.context_window : null,
      categories: Array.isArray(m.categories) ? m.categories.filter((c) => typeof c === "string") : [],
    });
  }
  // Each model once: in the first category (in the gateway's order) that lists it.
  const groups = [];
  const grouped = new Set();
  for (const category of Array.isArray(body.categories) ? body.categories : []) {
    const ids = (Array.isArray(category?.models) ? category.models : []).filter((id) => models.has(id) && !grouped.has(id));
    for (const id of ids) grouped.add(id);
    if (ids.length) groups.push({ id: asText(category.id), label: asText(category.label) || asText(category.id) || "Other", models: ids.map((id) => models.get(id)) });
  }
  const rest = [...models.values()].filter((m) => !grouped.has(m.id));
  if (rest.length) groups.push({ id: "other", label: "Other", models: rest });
  const note = body.degraded ? "categories are approximate (classifier unavailable)" : "";
  return { groups, models, note, unavailable: names(body.unavailable) };
}

function names(list) {
  return Array.isArray(list) ? list.filter((p) => typeof p === "string") : [];
}

function fromList(body) {
  const models = new Map();
  for (const card of Array.isArray(body.data) ? body.data : []) {
    const id = asText(card?.id);
    if (id) models.set(id, { id, provider: asText(card.owned_by), display_name: null, family: null, tier: null, context_window: null, categories: [] });
  }
  const groups = models.size ? [{ id: "models", label: "Models", models: [...models.values()] }] : [];
  return { groups, models, note: "", unavailable: names(body.unavailable) };
}

/** The groups with only the models whose id, name, family or categories contain `query`. */
export function filterGroups(groups, query) {
  const words = query.toLowerCase().split(/\s+/).filter(Boolean);
  if (!words.length) return groups;
  const matches = (m) => {
    const text = [m.id, m.display_name, m.family, m.tier, ...m.categories].filter(Boolean).join(" ").toLowerCase();
    return words.every((w) => text.includes(w));
  };
  return groups.map((g) => ({ ...g, models: g.models.filter(matches) })).filter((g) => g.models.length);
}

/** `/readyz` as JSON (public even with gateway keys), or null when it cannot be read. */
export async function loadReadiness() {
  try {
    const response = await fetch("readyz", { headers: { accept: "application/json" } });
    const body = await response.json();
    return body && typeof body === "object" ? body : null;
  } catch {
    return null;
  }
}

/**
 * What the page should say about model availability: `{blocking, title, reasons}`, or null
 * when everything is listed. `blocking` means no model at all, so nothing can be sent.
 */
export function availability(catalogue, readiness) {
  const checks = readiness?.checks || {};
  const errors = checks.provider_errors && typeof checks.provider_errors === "object" ? checks.provider_errors : {};
  const why = (name) => asText(errors[name]) || `${name}: its models could not be listed`;
  const reasons = catalogue.unavailable.map(why);
  if (catalogue.models.size) {
    if (!reasons.length) return null;
    const one = catalogue.unavailable.length === 1;
    const who = catalogue.unavailable.join(", ");
    return {
      blocking: false,
      title: one ? `${who} is unavailable: its models are missing from the list.` : `${who} are unavailable: their models are missing from the list.`,
      reasons,
    };
  }
  if (readiness?.reason === "shutting down") reasons.push("The gateway is shutting down.");
  const providers = checks.providers && typeof checks.providers === "object" ? Object.keys(checks.providers) : null;
  if (!reasons.length && providers && providers.length === 0) {
    reasons.push("The gateway has no provider configured: start it with OPENAI_API_KEY or ANTHROPIC_API_KEY set, add [[providers]] to its settings, or leave the demo provider on.");
  }
  if (!reasons.length) reasons.push("The providers listed no models.");
  return { blocking: true, title: "No model is available, so messages cannot be sent.", reasons };
}

/** A one-line description of a model's attributes, as text. */
export function describe(model) {
  if (!model) return "";
  const parts = [];
  if (model.provider) parts.push(model.provider);
  if (model.family) parts.push(model.family);
  if (model.tier) parts.push(`${model.tier} tier`);
  if (model.context_window) parts.push(`${formatTokens(model.context_window)} context`);
  if (model.categories.length) parts.push(model.categories.join(", "));
  // Each thing once: the demo provider's family is "demo" too.
  const seen = new Set();
  return parts.filter((p) => !seen.has(p.toLowerCase()) && seen.add(p.toLowerCase())).join(" · ");
}

function formatTokens(n) {
  return n >= 1000 ? `${Math.round(n / 1000)}k` : String(n);
}
