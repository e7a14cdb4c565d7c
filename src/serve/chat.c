/* Chat messages -> the RWKV chat prompt ("User: ...\n\nAssistant:"), the
 * lead before a turn that continues a session, and the reply's first space.
 * Called by src/serve/http.c; see chat.h for the contracts. */
#include "serve/chat.h"

#include <stdlib.h>
#include <string.h>

#include "text/stream.h"

int rp_chat_role_parse(const char *name) {
    /* "developer" is OpenAI's newer name for the system role */
    if (strcmp(name, "system") == 0 || strcmp(name, "developer") == 0) return RP_CHAT_SYSTEM;
    if (strcmp(name, "user") == 0) return RP_CHAT_USER;
    if (strcmp(name, "assistant") == 0) return RP_CHAT_ASSISTANT;
    return -1;
}

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* Appends content with every run of newlines that holds a blank line
 * collapsed to one newline (a blank line separates turns). */
static int append_collapsed(char **buf, size_t *len, size_t *cap, const char *c, size_t n) {
    if (rp_text_reserve(buf, cap, *len + n + 1) != 0) return -1;
    size_t i = 0;
    while (i < n) {
        if (c[i] == '\n' || c[i] == '\r') {
            size_t j = i, newlines = 0;
            while (j < n && (c[j] == '\n' || c[j] == '\r')) newlines += c[j++] == '\n';
            if (newlines >= 2) {
                (*buf)[(*len)++] = '\n';
            } else {
                memcpy(*buf + *len, c + i, j - i);
                *len += j - i;
            }
            i = j;
        } else {
            (*buf)[(*len)++] = c[i++];
        }
    }
    (*buf)[*len] = '\0';
    return 0;
}

char *rp_chat_prompt(const rp_chat_message *m, int n, const char *lead, size_t *len) {
    static const char *names[] = {"System:", "User:", "Assistant:"};
    char *buf = NULL;
    size_t cap = 0;
    size_t last_len = 0;
    *len = 0;
    if (rp_text_append(&buf, len, &cap, lead ? lead : "", lead ? strlen(lead) : 0) != 0) goto fail;
    for (int i = 0; i < n; i++) {
        const char *c = m[i].content ? m[i].content : "";
        size_t cl = m[i].content ? m[i].len : 0;
        if (m[i].role != RP_CHAT_ASSISTANT) {
            while (cl > 0 && is_space(c[0])) c++, cl--;
            while (cl > 0 && is_space(c[cl - 1])) cl--;
        } else if (cl > 0 && c[0] == ' ') {
            c++, cl--;  /* the format's own space, if the client kept it */
        }
        if (i > 0) {
            const char *sep = rp_chat_session_lead(buf, *len);
            if (rp_text_append(&buf, len, &cap, sep, strlen(sep)) != 0) goto fail;
        }
        const char *name = names[m[i].role];
        if (rp_text_append(&buf, len, &cap, name, strlen(name)) != 0) goto fail;
        if (rp_text_append(&buf, len, &cap, " ", 1) != 0) goto fail;
        if (append_collapsed(&buf, len, &cap, c, cl) != 0) goto fail;
        last_len = cl;
    }
    if (n == 0 || m[n - 1].role != RP_CHAT_ASSISTANT) {
        const char *sep = rp_chat_session_lead(buf, *len);
        if (rp_text_append(&buf, len, &cap, sep, strlen(sep)) != 0 ||
            rp_text_append(&buf, len, &cap, "Assistant:", 10) != 0)
            goto fail;
    } else if (last_len == 0) {
        /* an empty assistant message: continue right after "Assistant:" */
        buf[--*len] = '\0';
    }
    return buf;
fail:
    free(buf);
    return NULL;
}

const char *rp_chat_session_lead(const char *tail, size_t tail_len) {
    if (tail_len == 0) return "";
    if (tail_len >= 2 && tail[tail_len - 2] == '\n' && tail[tail_len - 1] == '\n') return "";
    if (tail[tail_len - 1] == '\n') return "\n";
    return "\n\n";
}

size_t rp_chat_reply_skip(const char *text, size_t len) { return len > 0 && text[0] == ' '; }
