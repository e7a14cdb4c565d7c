/* The JSON recogniser of structured output (json_grammar.h): a schema compiles (jansson) into a
 * table of nodes; the state is a stack of frames (object, array, string, number, literal), one
 * per value being written, each naming its node. Feeding a byte changes the top frame, pushes a
 * frame for a value that starts or pops one that ends (a number or literal ends on the byte
 * after it, which is then fed to the frame below). */
#include "text/json_grammar.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

enum { K_ANY, K_OBJECT, K_ARRAY, K_STRING, K_NUMBER, K_INTEGER, K_BOOL, K_NULL, K_ENUM, K_ANYOF };
/* Built-in nodes: any value, the literals true/false/null, any string, any number. */
enum { NODE_ANY = 0, NODE_LITERAL = 1, NODE_STRING = 2, NODE_NUMBER = 3, N_BUILTIN = 4 };

typedef struct {
    int kind;
    int prop_begin, n_props; /* object: props[prop_begin..] in the schema's order */
    int additional;          /* object: the node of other keys' values; -1 = none allowed */
    int items;               /* array */
    uint32_t min_items, max_items, min_len, max_len;
    int lit_begin, n_lits;   /* enum (and bool/null): serialized values */
    int alt_begin, n_alts;   /* anyOf */
    uint8_t first[32];       /* the bytes a value of this node can start with */
} node_t;

typedef struct {
    char *name;
    size_t len;
    int node, required;
} prop_t;

typedef struct {
    char *text;
    size_t len;
} lit_t;

struct rp_json_grammar {
    node_t *nodes;
    int n_nodes, cap_nodes;
    prop_t *props;
    int n_props, cap_props;
    lit_t *lits;
    int n_lits, cap_lits;
    int *alts;
    int n_alts, cap_alts;
    int root;
};

enum { F_OBJ = 1, F_ARR, F_STR, F_NUM, F_LIT };
enum { O_OPEN, O_WANTKEY, O_KEY, O_KEYM, O_COLON, O_VALSTART, O_VALUE, O_AFTER };
enum { A_OPEN, A_VALSTART, A_VALUE, A_AFTER };
enum { S_NORMAL, S_ESC, S_HEX, S_UTF8 };
enum { N_START, N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP };
#define POP 100 /* internal: the value ended before this byte; feed it to the frame below */

#define GROW(arr, n, cap)                                                        \
    ((n) < (cap) ? 0 : grow_array((void **)&(arr), &(cap), sizeof *(arr)))

static int grow_array(void **arr, int *cap, size_t elem) {
    int nc = *cap ? *cap * 2 : 16;
    void *p = realloc(*arr, (size_t)nc * elem);
    if (!p) return -1;
    *arr = p;
    *cap = nc;
    return 0;
}

static void set_bit(uint8_t *set, int b) { set[b >> 3] |= (uint8_t)(1u << (b & 7)); }
static int has_bit(const uint8_t *set, int b) { return (set[b >> 3] >> (b & 7)) & 1; }
static int is_ws(uint8_t b) { return b == ' ' || b == '\t' || b == '\n' || b == '\r'; }
static int is_digit(uint8_t b) { return b >= '0' && b <= '9'; }

static int new_node(rp_json_grammar *g, int kind) {
    if (GROW(g->nodes, g->n_nodes, g->cap_nodes)) return -1;
    node_t *n = &g->nodes[g->n_nodes];
    memset(n, 0, sizeof *n);
    n->kind = kind;
    n->additional = -1;
    n->items = NODE_ANY;
    n->max_items = UINT32_MAX;
    n->max_len = UINT32_MAX;
    return g->n_nodes++;
}

static int add_lit(rp_json_grammar *g, const char *text, size_t len) {
    if (GROW(g->lits, g->n_lits, g->cap_lits)) return -1;
    char *t = malloc(len + 1);
    if (!t) return -1;
    memcpy(t, text, len);
    t[len] = 0;
    g->lits[g->n_lits].text = t;
    g->lits[g->n_lits].len = len;
    return g->n_lits++;
}

static rp_json_grammar *grammar_new(void) {
    rp_json_grammar *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    int ok = new_node(g, K_ANY) == NODE_ANY && new_node(g, K_ENUM) == NODE_LITERAL &&
             new_node(g, K_STRING) == NODE_STRING && new_node(g, K_NUMBER) == NODE_NUMBER &&
             add_lit(g, "true", 4) == 0 && add_lit(g, "false", 5) == 1 && add_lit(g, "null", 4) == 2;
    if (!ok) {
        rp_json_grammar_free(g);
        return NULL;
    }
    g->nodes[NODE_ANY].additional = NODE_ANY; /* a generic object's values are any values */
    g->nodes[NODE_LITERAL].lit_begin = 0;
    g->nodes[NODE_LITERAL].n_lits = 3;
    return g;
}

void rp_json_grammar_free(rp_json_grammar *g) {
    if (!g) return;
    for (int i = 0; i < g->n_props; i++) free(g->props[i].name);
    for (int i = 0; i < g->n_lits; i++) free(g->lits[i].text);
    free(g->nodes);
    free(g->props);
    free(g->lits);
    free(g->alts);
    free(g);
}

/* ---- first bytes and the anyOf check ---- */

static void base_first(rp_json_grammar *g, node_t *n) {
    memset(n->first, 0, sizeof n->first);
    static const char any[] = "{[\"tfn-0123456789";
    switch (n->kind) {
    case K_ANY:
        for (const char *p = any; *p; p++) set_bit(n->first, (uint8_t)*p);
        break;
    case K_OBJECT: set_bit(n->first, '{'); break;
    case K_ARRAY: set_bit(n->first, '['); break;
    case K_STRING: set_bit(n->first, '"'); break;
    case K_NUMBER:
    case K_INTEGER:
        for (const char *p = any + 6; *p; p++) set_bit(n->first, (uint8_t)*p);
        break;
    case K_BOOL:
    case K_NULL:
    case K_ENUM:
        for (int i = 0; i < n->n_lits; i++)
            if (g->lits[n->lit_begin + i].len > 0)
                set_bit(n->first, (uint8_t)g->lits[n->lit_begin + i].text[0]);
        break;
    default: break;
    }
}

static rp_status finish_grammar(rp_json_grammar *g, rp_error *err) {
    for (int i = 0; i < g->n_nodes; i++) base_first(g, &g->nodes[i]);
    for (int changed = 1; changed;) { /* anyOf of anyOf (through $ref): to a fixed point */
        changed = 0;
        for (int i = 0; i < g->n_nodes; i++) {
            node_t *n = &g->nodes[i];
            if (n->kind != K_ANYOF) continue;
            for (int a = 0; a < n->n_alts; a++)
                for (int k = 0; k < 32; k++) {
                    uint8_t u = n->first[k] | g->nodes[g->alts[n->alt_begin + a]].first[k];
                    if (u != n->first[k]) changed = 1;
                    n->first[k] = u;
                }
        }
    }
    for (int i = 0; i < g->n_nodes; i++) {
        const node_t *n = &g->nodes[i];
        for (int a = 0; n->kind == K_ANYOF && a < n->n_alts; a++)
            for (int b = a + 1; b < n->n_alts; b++)
                for (int c = 0; c < 256; c++)
                    if (has_bit(g->nodes[g->alts[n->alt_begin + a]].first, c) &&
                        has_bit(g->nodes[g->alts[n->alt_begin + b]].first, c))
                        return rp_error_set(err, RP_ERR_ARG,
                                            "json schema: anyOf/oneOf alternatives %d and %d can "
                                            "both start with '%c'; only alternatives that start "
                                            "differently (e.g. an object, a string and null) are "
                                            "supported", a, b, c);
    }
    return RP_OK;
}

/* ---- schema compiler ---- */

typedef struct {
    rp_json_grammar *g;
    json_t *root;
    char *ref_names[256];
    int ref_nodes[256];
    int n_refs;
    rp_error *err;
} compiler;

static int fail(compiler *c, const char *fmt, const char *a) {
    rp_error_set(c->err, RP_ERR_ARG, fmt, a);
    return -1;
}

static int compile(compiler *c, json_t *s, int depth);

static int get_count(compiler *c, json_t *s, const char *key, uint32_t *out) {
    json_t *v = json_object_get(s, key);
    if (!v) return 0;
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 1000000)
        return fail(c, "json schema: \"%s\" must be an integer in [0, 1000000]", key);
    *out = (uint32_t)json_integer_value(v);
    return 0;
}

static int compile_object(compiler *c, json_t *s, int depth) {
    rp_json_grammar *g = c->g;
    json_t *props = json_object_get(s, "properties");
    json_t *req = json_object_get(s, "required");
    json_t *add = json_object_get(s, "additionalProperties");
    if (props && !json_is_object(props)) return fail(c, "json schema: \"%s\" must be an object", "properties");
    if (req && !json_is_array(req)) return fail(c, "json schema: \"%s\" must be an array", "required");
    size_t np = props ? json_object_size(props) : 0;
    if (np > RP_JSON_MAX_CHOICES) return fail(c, "json schema: an object has more than 64 %s", "properties");
    int begin = g->n_props;
    const char *key;
    json_t *sub;
    /* Names first, children after: a nested object appends its own properties, and this
     * object's must stay contiguous. */
    json_object_foreach(props, key, sub) {
        for (const char *p = key; *p; p++)
            if ((uint8_t)*p < 0x20 || *p == '"' || *p == '\\')
                return fail(c, "json schema: property name \"%s\" needs escaping; not supported", key);
        if (GROW(g->props, g->n_props, g->cap_props)) return fail(c, "json schema: %s", "out of memory");
        prop_t *pr = &g->props[g->n_props++];
        pr->name = strdup(key);
        pr->len = strlen(key);
        pr->required = 0;
        pr->node = NODE_ANY;
        if (!pr->name) return fail(c, "json schema: %s", "out of memory");
    }
    int k = begin;
    json_object_foreach(props, key, sub) {
        int id = compile(c, sub, depth + 1);
        if (id < 0) return -1;
        g->props[k++].node = id;
    }
    size_t i;
    json_t *r;
    json_array_foreach(req, i, r) {
        int found = 0;
        for (int p = begin; p < begin + (int)np && json_is_string(r); p++)
            if (strcmp(g->props[p].name, json_string_value(r)) == 0) g->props[p].required = found = 1;
        if (!found)
            return fail(c, "json schema: required property \"%s\" is not in \"properties\"",
                        json_is_string(r) ? json_string_value(r) : "(not a string)");
    }
    int additional = -1;
    if (np == 0) {
        if (!add || json_is_true(add)) additional = NODE_ANY;
        else if (!json_is_false(add) && (additional = compile(c, add, depth + 1)) < 0) return -1;
    } else if (add && !json_is_false(add)) {
        return fail(c, "json schema: %s is not supported (set it to false, or leave it out: "
                       "only the listed properties are written)", "additionalProperties with properties");
    }
    int id = new_node(g, K_OBJECT);
    if (id < 0) return fail(c, "json schema: %s", "out of memory");
    g->nodes[id].prop_begin = begin;
    g->nodes[id].n_props = (int)np;
    g->nodes[id].additional = additional;
    return id;
}

static int compile_typed(compiler *c, json_t *s, const char *type, int depth) {
    rp_json_grammar *g = c->g;
    if (strcmp(type, "object") == 0) return compile_object(c, s, depth);
    int id;
    if (strcmp(type, "array") == 0) {
        json_t *items = json_object_get(s, "items");
        int it = items ? compile(c, items, depth + 1) : NODE_ANY;
        if (it < 0 || (id = new_node(g, K_ARRAY)) < 0) return -1;
        node_t *n = &g->nodes[id];
        n->items = it;
        if (get_count(c, s, "minItems", &n->min_items) || get_count(c, s, "maxItems", &n->max_items)) return -1;
        if (n->min_items > n->max_items) return fail(c, "json schema: %s", "minItems > maxItems");
        return id;
    }
    if (strcmp(type, "string") == 0) {
        if ((id = new_node(g, K_STRING)) < 0) return -1;
        node_t *n = &g->nodes[id];
        if (get_count(c, s, "minLength", &n->min_len) || get_count(c, s, "maxLength", &n->max_len)) return -1;
        if (n->min_len > n->max_len) return fail(c, "json schema: %s", "minLength > maxLength");
        return id;
    }
    if (strcmp(type, "number") == 0) return new_node(g, K_NUMBER);
    if (strcmp(type, "integer") == 0) return new_node(g, K_INTEGER);
    if (strcmp(type, "boolean") == 0 || strcmp(type, "null") == 0) {
        int is_bool = type[0] == 'b';
        if ((id = new_node(g, is_bool ? K_BOOL : K_NULL)) < 0) return -1;
        g->nodes[id].lit_begin = is_bool ? 0 : 2;
        g->nodes[id].n_lits = is_bool ? 2 : 1;
        return id;
    }
    return fail(c, "json schema: unknown type \"%s\"", type);
}

static int compile_ref(compiler *c, const char *ref) {
    for (int i = 0; i < c->n_refs; i++)
        if (strcmp(c->ref_names[i], ref) == 0) return c->ref_nodes[i];
    const char *name = NULL;
    json_t *defs = NULL;
    if (strncmp(ref, "#/$defs/", 8) == 0) {
        name = ref + 8;
        defs = json_object_get(c->root, "$defs");
    } else if (strncmp(ref, "#/definitions/", 14) == 0) {
        name = ref + 14;
        defs = json_object_get(c->root, "definitions");
    } else {
        return fail(c, "json schema: $ref \"%s\" is not supported (only #/$defs/NAME and "
                       "#/definitions/NAME)", ref);
    }
    json_t *def = json_object_get(defs, name);
    if (!def) return fail(c, "json schema: $ref \"%s\" names no definition", ref);
    if (c->n_refs == 256) return fail(c, "json schema: more than 256 %s", "definitions");
    /* Reserve the node first so a recursive reference resolves to it. */
    int id = new_node(c->g, K_ANY);
    if (id < 0) return -1;
    c->ref_names[c->n_refs] = strdup(ref);
    c->ref_nodes[c->n_refs++] = id;
    int body = compile(c, def, 0);
    if (body < 0) return -1;
    c->g->nodes[id] = c->g->nodes[body];
    return id;
}

static int compile(compiler *c, json_t *s, int depth) {
    rp_json_grammar *g = c->g;
    if (depth > RP_JSON_MAX_DEPTH - 2)
        return fail(c, "json schema: it nests deeper than %s levels; flatten it", "30");
    if (json_is_true(s)) return NODE_ANY;
    if (!json_is_object(s)) return fail(c, "json schema: %s", "a schema must be an object (or true)");
    static const char *known[] = {"type", "properties", "required", "additionalProperties", "items",
                                  "minItems", "maxItems", "enum", "const", "minLength", "maxLength",
                                  "$ref", "$defs", "definitions", "anyOf", "oneOf", "title",
                                  "description", "$schema", "$id", "default", "examples", NULL};
    const char *key;
    json_t *v;
    json_object_foreach(s, key, v) {
        int ok = 0;
        for (int i = 0; known[i] && !ok; i++) ok = strcmp(known[i], key) == 0;
        if (!ok)
            return fail(c, "json schema: the keyword \"%s\" is not supported (supported: type, "
                           "properties, required, additionalProperties, items, minItems, maxItems, "
                           "enum, const, minLength, maxLength, $ref, $defs, anyOf, oneOf)", key);
    }
    json_t *ref = json_object_get(s, "$ref");
    if (ref) {
        if (!json_is_string(ref)) return fail(c, "json schema: %s", "$ref must be a string");
        return compile_ref(c, json_string_value(ref));
    }
    json_t *any = json_object_get(s, "anyOf");
    if (!any) any = json_object_get(s, "oneOf");
    json_t *en = json_object_get(s, "enum");
    json_t *cn = json_object_get(s, "const");
    if (en || cn) {
        if (en && (!json_is_array(en) || json_array_size(en) == 0 ||
                   json_array_size(en) > RP_JSON_MAX_CHOICES))
            return fail(c, "json schema: %s", "enum must be an array of 1 to 64 values");
        int id = new_node(g, K_ENUM);
        if (id < 0) return -1;
        g->nodes[id].lit_begin = g->n_lits;
        size_t n = en ? json_array_size(en) : 1;
        for (size_t i = 0; i < n; i++) {
            char *text = json_dumps(en ? json_array_get(en, i) : cn, JSON_COMPACT | JSON_ENCODE_ANY);
            if (!text) return fail(c, "json schema: %s", "an enum value cannot be serialized");
            int l = add_lit(g, text, strlen(text));
            free(text);
            if (l < 0) return -1;
        }
        g->nodes[id].n_lits = (int)n;
        return id;
    }
    json_t *type = json_object_get(s, "type");
    if (any || json_is_array(type)) {
        json_t *list = any ? any : type;
        if (!json_is_array(list) || json_array_size(list) == 0 || json_array_size(list) > 16)
            return fail(c, "json schema: %s", "anyOf/oneOf/type lists must have 1 to 16 entries");
        int ids[16];
        size_t n = json_array_size(list);
        for (size_t i = 0; i < n; i++) {
            json_t *e = json_array_get(list, i);
            if (any) ids[i] = compile(c, e, depth + 1);
            else if (json_is_string(e)) ids[i] = compile_typed(c, s, json_string_value(e), depth);
            else return fail(c, "json schema: %s", "type lists must hold strings");
            if (ids[i] < 0) return -1;
        }
        int id = new_node(g, K_ANYOF);
        if (id < 0) return -1;
        g->nodes[id].alt_begin = g->n_alts;
        g->nodes[id].n_alts = (int)n;
        for (size_t i = 0; i < n; i++) {
            if (GROW(g->alts, g->n_alts, g->cap_alts)) return -1;
            g->alts[g->n_alts++] = ids[i];
        }
        return id;
    }
    if (type && !json_is_string(type)) return fail(c, "json schema: %s", "type must be a string or a list");
    const char *t = type ? json_string_value(type) : NULL;
    if (!t) {
        if (json_object_get(s, "properties") || json_object_get(s, "required") ||
            json_object_get(s, "additionalProperties"))
            t = "object";
        else if (json_object_get(s, "items") || json_object_get(s, "minItems") ||
                 json_object_get(s, "maxItems"))
            t = "array";
        else if (json_object_get(s, "minLength") || json_object_get(s, "maxLength"))
            t = "string";
        else
            return NODE_ANY;
    }
    return compile_typed(c, s, t, depth);
}

rp_status rp_json_grammar_object(rp_json_grammar **out, rp_error *err) {
    *out = NULL;
    rp_json_grammar *g = grammar_new();
    int id = g ? new_node(g, K_OBJECT) : -1;
    if (id < 0) {
        rp_json_grammar_free(g);
        return rp_error_set(err, RP_ERR_NOMEM, "json grammar: out of memory");
    }
    g->nodes[id].additional = NODE_ANY;
    g->root = id;
    finish_grammar(g, err);
    *out = g;
    return RP_OK;
}

rp_status rp_json_grammar_schema(rp_json_grammar **out, const char *schema, size_t len,
                                 rp_error *err) {
    *out = NULL;
    json_error_t jerr;
    json_t *root = json_loadb(schema, len, 0, &jerr);
    if (!root)
        return rp_error_set(err, RP_ERR_ARG, "json schema: not valid JSON (%s at offset %d)",
                            jerr.text, jerr.position);
    compiler c = {.g = grammar_new(), .root = root, .err = err};
    if (!c.g) {
        json_decref(root);
        return rp_error_set(err, RP_ERR_NOMEM, "json grammar: out of memory");
    }
    int id = compile(&c, root, 0);
    for (int i = 0; i < c.n_refs; i++) free(c.ref_names[i]);
    json_decref(root);
    rp_status st = id < 0 ? RP_ERR_ARG : RP_OK;
    if (id >= 0) {
        c.g->root = id;
        st = finish_grammar(c.g, err);
    }
    if (st != RP_OK) {
        if (err && err->code == RP_OK) rp_error_set(err, RP_ERR_ARG, "json schema: cannot compile");
        rp_json_grammar_free(c.g);
        return err ? err->code : RP_ERR_ARG;
    }
    *out = c.g;
    return RP_OK;
}

/* ---- the automaton ---- */

static rp_json_result push(rp_json_state *s, int kind, int node) {
    if (s->depth >= RP_JSON_MAX_DEPTH) return RP_JSON_TOO_DEEP;
    rp_json_frame *f = &s->f[s->depth++];
    memset(f, 0, sizeof *f);
    f->kind = (uint8_t)kind;
    f->node = (uint16_t)node;
    return RP_JSON_OK;
}

static void pop(rp_json_state *s) {
    s->depth--;
    if (s->depth == 0) {
        s->done = 1;
        return;
    }
    rp_json_frame *p = &s->f[s->depth - 1];
    if (p->kind == F_OBJ) p->sub = p->sub == O_KEY ? O_COLON : O_AFTER;
    else if (p->kind == F_ARR) {
        p->sub = A_AFTER;
        p->count++;
    }
}

static rp_json_result ws_byte(rp_json_state *s) {
    if (s->ws >= RP_JSON_MAX_WS) return RP_JSON_REJECT;
    s->ws++;
    return RP_JSON_OK;
}

static int lit_feed(const rp_json_grammar *g, rp_json_state *s, uint8_t b);
static int num_feed(const rp_json_grammar *g, rp_json_state *s, uint8_t b);

static rp_json_result start_value(const rp_json_grammar *g, rp_json_state *s, int node, uint8_t b) {
    const node_t *n = &g->nodes[node];
    while (n->kind == K_ANYOF) {
        int next = -1;
        for (int a = 0; a < n->n_alts && next < 0; a++)
            if (has_bit(g->nodes[g->alts[n->alt_begin + a]].first, b)) next = g->alts[n->alt_begin + a];
        if (next < 0) return RP_JSON_REJECT;
        node = next;
        n = &g->nodes[node];
    }
    if (!has_bit(n->first, b)) return RP_JSON_REJECT;
    int kind = n->kind;
    if (kind == K_ANY) {
        if (b == '{') kind = K_OBJECT;
        else if (b == '[') kind = K_ARRAY;
        else if (b == '"') node = NODE_STRING, kind = K_STRING;
        else if (b == 't' || b == 'f' || b == 'n') node = NODE_LITERAL, kind = K_ENUM;
        else node = NODE_NUMBER, kind = K_NUMBER;
    }
    rp_json_result r;
    switch (kind) {
    case K_OBJECT: return push(s, F_OBJ, node);
    case K_ARRAY: return push(s, F_ARR, node);
    case K_STRING: return push(s, F_STR, node);
    case K_NUMBER:
    case K_INTEGER:
        if ((r = push(s, F_NUM, node)) != RP_JSON_OK) return r;
        return num_feed(g, s, b) == RP_JSON_OK ? RP_JSON_OK : RP_JSON_REJECT;
    default: /* bool, null, enum */
        if ((r = push(s, F_LIT, node)) != RP_JSON_OK) return r;
        s->f[s->depth - 1].bits = g->nodes[node].n_lits >= 64 ? ~0ull
                                                              : (1ull << g->nodes[node].n_lits) - 1;
        return lit_feed(g, s, b) == RP_JSON_OK ? RP_JSON_OK : RP_JSON_REJECT;
    }
}

/* The properties that may come next: from index next up to the first required one. */
static uint64_t key_candidates(const rp_json_grammar *g, const node_t *n, uint32_t next) {
    uint64_t m = 0;
    for (int i = (int)next; i < n->n_props; i++) {
        m |= 1ull << i;
        if (g->props[n->prop_begin + i].required) break;
    }
    return m;
}

static int required_left(const rp_json_grammar *g, const node_t *n, uint32_t next) {
    for (int i = (int)next; i < n->n_props; i++)
        if (g->props[n->prop_begin + i].required) return 1;
    return 0;
}

static rp_json_result obj_feed(const rp_json_grammar *g, rp_json_state *s, uint8_t b) {
    rp_json_frame *f = &s->f[s->depth - 1];
    const node_t *n = &g->nodes[f->node];
    const int generic = n->n_props == 0;
    switch (f->sub) {
    case O_OPEN:
    case O_WANTKEY:
    case O_AFTER:
        if (is_ws(b)) return ws_byte(s);
        if (b == '}') {
            if (f->sub == O_WANTKEY || (!generic && required_left(g, n, f->count))) return RP_JSON_REJECT;
            pop(s);
            return RP_JSON_OK;
        }
        if (b == ',') {
            if (f->sub != O_AFTER) return RP_JSON_REJECT;
            if (generic ? n->additional < 0 : key_candidates(g, n, f->count) == 0) return RP_JSON_REJECT;
            f->sub = O_WANTKEY;
            return RP_JSON_OK;
        }
        if (b != '"' || f->sub == O_AFTER) return RP_JSON_REJECT;
        if (generic) {
            if (n->additional < 0) return RP_JSON_REJECT;
            f->sub = O_KEY;
            return push(s, F_STR, NODE_STRING);
        }
        f->bits = key_candidates(g, n, f->count);
        if (!f->bits) return RP_JSON_REJECT;
        f->pos = 0;
        f->sub = O_KEYM;
        return RP_JSON_OK;
    case O_KEYM: {
        uint64_t keep = 0;
        for (int i = 0; i < n->n_props; i++) {
            if (!((f->bits >> i) & 1)) continue;
            const prop_t *p = &g->props[n->prop_begin + i];
            if (b == '"' ? p->len == f->pos : (p->len > f->pos && (uint8_t)p->name[f->pos] == b))
                keep |= 1ull << i;
        }
        if (!keep) return RP_JSON_REJECT;
        if (b == '"') {
            int i = 0;
            while (!((keep >> i) & 1)) i++;
            f->aux = (uint8_t)i;
            f->count = (uint32_t)i + 1;
            f->bits = 0;
            f->pos = 0;
            f->sub = O_COLON;
        } else {
            f->bits = keep;
            f->pos++;
        }
        return RP_JSON_OK;
    }
    case O_COLON:
        if (is_ws(b)) return ws_byte(s);
        if (b != ':') return RP_JSON_REJECT;
        f->sub = O_VALSTART;
        return RP_JSON_OK;
    case O_VALSTART: {
        if (is_ws(b)) return ws_byte(s);
        int child = generic ? n->additional : g->props[n->prop_begin + f->aux].node;
        f->sub = O_VALUE;
        return start_value(g, s, child, b);
    }
    default: return RP_JSON_REJECT;
    }
}

static rp_json_result arr_feed(const rp_json_grammar *g, rp_json_state *s, uint8_t b) {
    rp_json_frame *f = &s->f[s->depth - 1];
    const node_t *n = &g->nodes[f->node];
    if (is_ws(b) && f->sub != A_VALUE) return ws_byte(s);
    switch (f->sub) {
    case A_OPEN:
        if (b == ']') {
            if (n->min_items > 0) return RP_JSON_REJECT;
            pop(s);
            return RP_JSON_OK;
        }
        if (n->max_items == 0) return RP_JSON_REJECT;
        f->sub = A_VALUE;
        return start_value(g, s, n->items, b);
    case A_VALSTART:
        f->sub = A_VALUE;
        return start_value(g, s, n->items, b);
    case A_AFTER:
        if (b == ',' && f->count < n->max_items) {
            f->sub = A_VALSTART;
            return RP_JSON_OK;
        }
        if (b == ']' && f->count >= n->min_items) {
            pop(s);
            return RP_JSON_OK;
        }
        return RP_JSON_REJECT;
    default: return RP_JSON_REJECT;
    }
}

static int hex_value(uint8_t b) {
    if (is_digit(b)) return b - '0';
    if (b >= 'a' && b <= 'f') return b - 'a' + 10;
    if (b >= 'A' && b <= 'F') return b - 'A' + 10;
    return -1;
}

static rp_json_result str_feed(const rp_json_grammar *g, rp_json_state *s, uint8_t b) {
    rp_json_frame *f = &s->f[s->depth - 1];
    const node_t *n = &g->nodes[f->node];
    /* Only limited strings count characters, so an unlimited one has one state per context. */
    const int counting = n->max_len != UINT32_MAX || n->min_len > 0;
    switch (f->sub) {
    case S_NORMAL:
        if (b == '"') {
            if (f->count < n->min_len) return RP_JSON_REJECT;
            pop(s);
            return RP_JSON_OK;
        }
        if (b < 0x20) return RP_JSON_REJECT;
        if (counting && f->count >= n->max_len) return RP_JSON_REJECT;
        if (b == '\\') f->sub = S_ESC;
        else if (b >= 0x80) {
            /* UTF-8: the lead byte fixes how many continuation bytes follow and the range of
             * the first (no overlong forms, no surrogates, nothing above U+10FFFF). */
            f->lo = 0x80;
            f->hi = 0xBF;
            if (b >= 0xC2 && b <= 0xDF) f->aux = 1;
            else if (b >= 0xE0 && b <= 0xEF) {
                f->aux = 2;
                if (b == 0xE0) f->lo = 0xA0;
                if (b == 0xED) f->hi = 0x9F;
            } else if (b >= 0xF0 && b <= 0xF4) {
                f->aux = 3;
                if (b == 0xF0) f->lo = 0x90;
                if (b == 0xF4) f->hi = 0x8F;
            } else return RP_JSON_REJECT;
            f->sub = S_UTF8;
        }
        if (counting) f->count++;
        return RP_JSON_OK;
    case S_UTF8:
        if (b < f->lo || b > f->hi) return RP_JSON_REJECT;
        f->lo = 0x80;
        f->hi = 0xBF;
        if (--f->aux == 0) {
            f->sub = S_NORMAL;
            f->lo = f->hi = 0;
        }
        return RP_JSON_OK;
    case S_ESC:
        if (b == 'u') {
            f->sub = S_HEX;
            f->pos = 0;
            return RP_JSON_OK;
        }
        if (!strchr("\"\\/bfnrt", b) || b == 0) return RP_JSON_REJECT;
        f->sub = S_NORMAL;
        return RP_JSON_OK;
    case S_HEX: {
        int v = hex_value(b);
        if (v < 0) return RP_JSON_REJECT;
        /* No \uD800-\uDFFF: a lone surrogate is not a character, and a pair would count twice. */
        if (f->pos == 0) f->lo = v == 0xD;
        else if (f->pos == 1 && f->lo && v >= 8) return RP_JSON_REJECT;
        if (++f->pos == 4) {
            f->sub = S_NORMAL;
            f->pos = 0;
            f->lo = 0;
        }
        return RP_JSON_OK;
    }
    default: return RP_JSON_REJECT;
    }
}

static int num_may_end(int st) { return st == N_ZERO || st == N_INT || st == N_FRAC || st == N_EXP; }

static int num_feed(const rp_json_grammar *g, rp_json_state *s, uint8_t b) {
    rp_json_frame *f = &s->f[s->depth - 1];
    const int integer = g->nodes[f->node].kind == K_INTEGER;
    int next = -1;
    switch (f->sub) {
    case N_START:
        if (b == '-') next = N_MINUS;
        /* fallthrough */
    case N_MINUS:
        if (b == '0') next = N_ZERO;
        else if (b >= '1' && b <= '9') next = N_INT, f->count = 0;
        break;
    case N_INT:
        if (is_digit(b) && f->count < RP_JSON_MAX_DIGITS) next = N_INT;
        /* fallthrough */
    case N_ZERO:
        if (!integer && b == '.') next = N_DOT;
        if (!integer && (b == 'e' || b == 'E')) next = N_E;
        break;
    case N_DOT:
        if (is_digit(b)) next = N_FRAC, f->count = 0;
        break;
    case N_FRAC:
        if (is_digit(b) && f->count < RP_JSON_MAX_DIGITS) next = N_FRAC;
        if (b == 'e' || b == 'E') next = N_E;
        break;
    case N_E:
        if (b == '+' || b == '-') next = N_ESIGN;
        /* fallthrough */
    case N_ESIGN:
        if (is_digit(b)) next = N_EXP, f->count = 0;
        break;
    case N_EXP:
        if (is_digit(b) && f->count < 3) next = N_EXP;
        break;
    }
    if (next < 0) return num_may_end(f->sub) ? POP : RP_JSON_REJECT;
    if (next == N_INT || next == N_FRAC || next == N_EXP) f->count++;
    else f->count = 0;
    f->sub = (uint8_t)next;
    return RP_JSON_OK;
}

static int lit_complete(const rp_json_grammar *g, const rp_json_frame *f) {
    const node_t *n = &g->nodes[f->node];
    for (int i = 0; i < n->n_lits; i++)
        if (((f->bits >> i) & 1) && g->lits[n->lit_begin + i].len == f->pos) return 1;
    return 0;
}

static int lit_feed(const rp_json_grammar *g, rp_json_state *s, uint8_t b) {
    rp_json_frame *f = &s->f[s->depth - 1];
    const node_t *n = &g->nodes[f->node];
    uint64_t keep = 0;
    int longer = 0;
    for (int i = 0; i < n->n_lits; i++) {
        const lit_t *l = &g->lits[n->lit_begin + i];
        if (((f->bits >> i) & 1) && l->len > f->pos && (uint8_t)l->text[f->pos] == b) {
            keep |= 1ull << i;
            longer |= l->len > (size_t)f->pos + 1;
        }
    }
    if (!keep) return lit_complete(g, f) ? POP : RP_JSON_REJECT;
    f->bits = keep;
    f->pos++;
    if (!longer) pop(s); /* every candidate left is complete: nothing can extend it */
    return RP_JSON_OK;
}

rp_json_result rp_json_feed(const rp_json_grammar *g, rp_json_state *s, uint8_t b) {
    if (!is_ws(b)) s->ws = 0;
    for (;;) {
        if (s->depth == 0) {
            if (s->done) return RP_JSON_REJECT;
            if (is_ws(b)) return ws_byte(s);
            return start_value(g, s, g->root, b);
        }
        int r;
        switch (s->f[s->depth - 1].kind) {
        case F_OBJ: return obj_feed(g, s, b);
        case F_ARR: return arr_feed(g, s, b);
        case F_STR: return str_feed(g, s, b);
        case F_NUM: r = num_feed(g, s, b); break;
        default: r = lit_feed(g, s, b); break;
        }
        if (r != POP) return (rp_json_result)r;
        pop(s); /* the number or literal ended before b */
    }
}

void rp_json_start(const rp_json_grammar *g, rp_json_state *s) {
    (void)g;
    memset(s, 0, sizeof *s);
}

int rp_json_complete(const rp_json_grammar *g, const rp_json_state *s) {
    if (s->done) return 1;
    if (s->depth != 1) return 0;
    const rp_json_frame *f = &s->f[0];
    if (f->kind == F_NUM) return num_may_end(f->sub);
    if (f->kind == F_LIT) return lit_complete(g, f);
    return 0;
}

size_t rp_json_state_bytes(const rp_json_state *s) {
    return offsetof(rp_json_state, f) + (size_t)s->depth * sizeof(rp_json_frame);
}

void rp_json_state_copy(rp_json_state *dst, const rp_json_state *src) {
    memcpy(dst, src, rp_json_state_bytes(src));
}
