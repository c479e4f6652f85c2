// rclip's query arithmetic in the search box: `beach + sunset - people`, with an optional weight per
// term (`beach - 0.5:people`). Pure, so it is tested without a browser (tests/web/test_terms.py).

/**
 * The weighted terms of a query, or null when it is a plain text (no ` + ` / ` - ` between terms and
 * no weight), which the page sends to /v1/search/text as before.
 * @param {string} query
 * @returns {{text: string, weight: number}[] | null}
 */
export function parseTerms(query) {
  const parts = query.trim().split(/\s+([+-])\s+/);
  const terms = [];
  let sign = 1;
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      sign = part === "-" ? -1 : 1;
      return;
    }
    let text = part.trim();
    let weight = 1;
    const m = text.match(/^(\d+(?:\.\d+)?|\.\d+):\s*(.+)$/);
    if (m) {
      weight = parseFloat(m[1]);
      text = m[2].trim();
    }
    if (text) terms.push({ text, weight: sign * weight });
  });
  if (terms.length === 0) return null;
  if (terms.length === 1 && terms[0].weight === 1) return null;
  return terms;
}
