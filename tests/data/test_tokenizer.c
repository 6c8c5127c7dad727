/* Tokenizer tests.
 *
 * 1. SHA-256 against FIPS/NIST vectors and padding boundaries.
 * 2. The BPE rules on a hand-made vocabulary: highest score first, ties leftmost, user-defined
 *    symbols frozen, byte fallback, spaces/newlines, the cap contract, decode.
 * 3. Against the prepared test data ($BAM_TEST_DATA from data/prepare.py --test): the
 *    documents of every domain's text/<domain>/val.jsonl (extracted by $BAM_PYTHON) are cut
 *    into lines as prepare.py does and encoded by spm_encode with the trained model and by
 *    bam_tokenizer_encode, which must agree on at least 99.9% of lines (mismatches are
 *    printed); whole documents must encode to exactly their ids in tokens/<domain>.h5 /val
 *    (documents in order, each followed by EOS); decode(encode(text)) must give the text
 *    back; the identity must be the vocabulary's sha256sum prefix and the 'tokenizer'
 *    attribute of every token file, whose val splits must load with this vocab size and
 *    decode to text_bytes bytes. */
#include <dirent.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bam/data.h"
#include "bam/tokenizer.h"
#include "test_util.h"

/* ---- small file helpers ---- */

static char *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *buf = malloc((size_t)n + 1);
  if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
    free(buf);
    buf = NULL;
  }
  fclose(f);
  if (buf) buf[n] = 0;
  if (len) *len = (size_t)n;
  return buf;
}

static int spit(const char *path, const char *text) {
  FILE *f = fopen(path, "wb");
  if (!f) return 0;
  int ok = fputs(text, f) >= 0;
  return fclose(f) == 0 && ok;
}

static int file_exists(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0;
}

/* ---- 1. SHA-256 ---- */

static void hex(const uint8_t d[32], char out[65]) {
  for (int i = 0; i < 32; i++) snprintf(out + 2 * i, 3, "%02x", d[i]);
}

static void test_sha256(void) {
  struct {
    const char *msg;
    const char *digest;
  } v[] = {
      {"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
      {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
      {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
       "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
  };
  uint8_t d[32];
  char h[65];
  for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
    bam_sha256(v[i].msg, strlen(v[i].msg), d);
    hex(d, h);
    T_CHECK(!strcmp(h, v[i].digest), "sha256(\"%s\") = %s, expected %s", v[i].msg, h,
            v[i].digest);
  }
  /* bytes 0, 1, ..., n-1 around the one/two-block padding boundaries (hashlib values) */
  struct {
    int n;
    const char *digest;
  } b[] = {
      {55, "463eb28e72f82e0a96c0a4cc53690c571281131f672aa229e0d45ae59b598b59"},
      {56, "da2ae4d6b36748f2a318f23e7ab1dfdf45acdc9d049bd80e59de82a60895f562"},
      {63, "29af2686fd53374a36b0846694cc342177e428d1647515f078784d69cdb9e488"},
      {64, "fdeab9acf3710362bd2658cdc9a29e8f9c757fcf9811603a8c447cd1d9151108"},
      {65, "4bfd2c8b6f1eec7a2afeb48b934ee4b2694182027e6d0fc075074f2fabb31781"},
      {119, "da18797ed7c3a777f0847f429724a2d8cd5138e6ed2895c3fa1a6d39d18f7ec6"},
      {120, "f52b23db1fbb6ded89ef42a23ce0c8922c45f25c50b568a93bf1c075420bbb7c"},
      {128, "471fb943aa23c511f6f72f8d1652d9c880cfa392ad80503120547703e56a2be5"},
  };
  uint8_t bytes[128];
  for (int i = 0; i < 128; i++) bytes[i] = (uint8_t)i;
  for (size_t i = 0; i < sizeof b / sizeof b[0]; i++) {
    bam_sha256(bytes, (size_t)b[i].n, d);
    hex(d, h);
    T_CHECK(!strcmp(h, b[i].digest), "sha256 of %d bytes = %s, expected %s", b[i].n, h,
            b[i].digest);
  }
  size_t n = 1000000;
  char *a = malloc(n);
  memset(a, 'a', n);
  bam_sha256(a, n, d);
  free(a);
  hex(d, h);
  T_CHECK(!strcmp(h, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"),
          "sha256 of a million 'a' = %s", h);
}

/* ---- 2. BPE rules on a hand-made vocabulary ---- */

/* Encode text and compare with the expected pieces, space-separated. */
static void expect_pieces(const bam_tokenizer *t, const char *text, const char *want) {
  int32_t ids[256];
  size_t n = 0;
  T_OK(bam_tokenizer_encode(t, text, strlen(text), ids, 256, &n));
  char got[2048] = "";
  for (size_t i = 0; i < n; i++) {
    if (i) strcat(got, " ");
    strcat(got, bam_tokenizer_piece(t, ids[i]));
  }
  T_CHECK(!strcmp(got, want), "encode(\"%s\") = [%s], expected [%s]", text, got, want);
  char back[1024];
  size_t len = 0;
  T_OK(bam_tokenizer_decode(t, ids, n, back, sizeof back, &len));
  T_CHECK(len == strlen(text) && !strcmp(back, text), "decode(encode(\"%s\")) = \"%s\"", text,
          back);
}

static void test_rules(const char *dir) {
  /* ids: 0 <unk>, 1 <s>, 2 </s>, 3 ⏎, 4..259 bytes, then the pieces below (scored as spm
   * trains them: merges first, "-0" for the first one, then characters) */
  char path[512];
  snprintf(path, sizeof path, "%s/rules.vocab", dir);
  FILE *f = fopen(path, "wb");
  T_CHECK(f != NULL, "cannot write %s", path);
  if (!f) return;
  fputs("<unk>\t0\n<s>\t0\n</s>\t0\n\xE2\x8F\x8E\t0\n", f);
  for (int b = 0; b < 256; b++) fprintf(f, "<0x%02X>\t0\n", b);
  const char *pieces[] = {
      "ab\t-0", "aa\t-1", "bc\t-2", "abc\t-3",
      "\xE2\x8F\x8E" "a\t-4", /* "⏎a": never used, ⏎ is never merged */
      "\xE2\x96\x81" "a\t-5", /* "▁a" */
      "\t\t-6",                /* a tab piece: the score follows the last tab */
      "a\t-7", "b\t-8", "c\t-9",
      "\xE2\x96\x81\t-10",     /* "▁" */
      "x\t-11",
      "cx\t-3",                 /* ties abc: the leftmost pair wins */
      "cab\t0", "ca\t0",        /* user-defined: matched whole, longest first */
  };
  for (size_t i = 0; i < sizeof pieces / sizeof pieces[0]; i++) fprintf(f, "%s\n", pieces[i]);
  fclose(f);

  bam_tokenizer *t = NULL;
  T_OK(bam_tokenizer_load(&t, path));
  if (!t) return;
  T_CHECK(bam_tokenizer_vocab_size(t) == 4 + 256 + 15, "vocab size %d",
          bam_tokenizer_vocab_size(t));
  T_CHECK(bam_tokenizer_eos(t) == 2, "eos %d", bam_tokenizer_eos(t));
  T_CHECK(!strcmp(bam_tokenizer_piece(t, 3), "\xE2\x8F\x8E"), "piece 3 '%s'",
          bam_tokenizer_piece(t, 3));
  expect_pieces(t, "abc", "abc");         /* ab (-0) before bc (-2), then ab+c */
  expect_pieces(t, "aaa", "aa a");        /* equal scores: leftmost first */
  expect_pieces(t, "bcxab", "bc x ab");    /* ab first, then bc, which voids cx */
  expect_pieces(t, "a\na", "a \xE2\x8F\x8E a");    /* ⏎ is frozen: no "⏎a" */
  expect_pieces(t, " a  b", "\xE2\x96\x81" "a \xE2\x96\x81 \xE2\x96\x81 b");
  expect_pieces(t, "a\tb", "a \t b");
  expect_pieces(t, "\xC3\xA9", "<0xC3> <0xA9>"); /* é is not a piece: its bytes */
  expect_pieces(t, "bcx", "bc x");        /* bc (-2) beats cx (-3) */
  expect_pieces(t, "abcx", "abc x");      /* ab first, then abc and cx tie: leftmost wins */
  expect_pieces(t, "abcabc", "ab cab c");  /* "cab" is matched whole, not "ca" */
  expect_pieces(t, "bcaa", "b ca a");      /* user symbols never merge: no "bc", no "aa" */
  expect_pieces(t, "", "");

  /* malformed UTF-8 becomes U+FFFD, spelled by bytes here */
  int32_t ids[64];
  size_t n = 0;
  T_OK(bam_tokenizer_encode(t, "a\xFF", 2, ids, 64, &n));
  T_CHECK(n == 4 && ids[1] == 4 + 0xEF && ids[2] == 4 + 0xBF && ids[3] == 4 + 0xBD,
          "malformed byte: %zu ids", n);
  /* too small a buffer: an error, and *n says how many are needed */
  bam_status s = bam_tokenizer_encode(t, "abcabc", 6, ids, 1, &n);
  T_CHECK(s == BAM_ERR_ARG && n == 3, "cap 1: status %d, n %zu", s, n);
  T_CHECK(strstr(bam_error_message(), "needs 3 ids") != NULL, "message: %s",
          bam_error_message());
  bam_error_clear();
  s = bam_tokenizer_encode(t, "abcabc", 6, NULL, 0, &n);
  T_CHECK(s == BAM_ERR_ARG && n == 3, "measuring: status %d, n %zu", s, n);
  bam_error_clear();
  /* decode: control pieces vanish, out-of-range ids and small buffers are errors */
  int32_t seq[] = {1, 7 + 4 + 256, 2, 3, 0};
  char out[16];
  size_t len;
  T_OK(bam_tokenizer_decode(t, seq, 5, out, sizeof out, &len));
  T_CHECK(!strcmp(out, "a\n") && len == 2, "decode = \"%s\"", out);
  int32_t bad[] = {5, 100000};
  s = bam_tokenizer_decode(t, bad, 2, out, sizeof out, &len);
  T_CHECK(s == BAM_ERR_ARG && strstr(bam_error_message(), "id 100000 at index 1"),
          "bad id: %s", bam_error_message());
  bam_error_clear();
  s = bam_tokenizer_decode(t, seq, 5, out, 2, &len);
  T_CHECK(s == BAM_ERR_ARG && len == 2, "decode into 2 bytes: status %d len %zu", s, len);
  bam_error_clear();
  bam_tokenizer_free(&t);
  T_CHECK(t == NULL, "free clears the pointer");

  /* load errors name the file (and line) */
  snprintf(path, sizeof path, "%s/missing.vocab", dir);
  s = bam_tokenizer_load(&t, path);
  T_CHECK(s == BAM_ERR_IO && strstr(bam_error_message(), path), "missing: %s",
          bam_error_message());
  bam_error_clear();
  snprintf(path, sizeof path, "%s/bad.vocab", dir);
  spit(path, "<unk>\t0\n<s>\t0\n</s>\t0\nabc\n");
  s = bam_tokenizer_load(&t, path);
  T_CHECK(s == BAM_ERR_DATA && strstr(bam_error_message(), "bad.vocab:4"), "no score: %s",
          bam_error_message());
  bam_error_clear();
  spit(path, "<unk>\t0\n<s>\t0\n</s>\t0\nab\t-1\nab\t-2\n");
  s = bam_tokenizer_load(&t, path);
  T_CHECK(s == BAM_ERR_DATA && strstr(bam_error_message(), "bad.vocab:5") &&
              strstr(bam_error_message(), "repeats"),
          "duplicate: %s", bam_error_message());
  bam_error_clear();
  spit(path, "<unk>\t0\n<s>\t0\nab\t-1\n");
  s = bam_tokenizer_load(&t, path);
  T_CHECK(s == BAM_ERR_DATA && strstr(bam_error_message(), "</s>"), "no eos: %s",
          bam_error_message());
  bam_error_clear();
  spit(path, "<unk>\t0\n<s>\t0\n</s>\tx1\n");
  s = bam_tokenizer_load(&t, path);
  T_CHECK(s == BAM_ERR_DATA && strstr(bam_error_message(), "bad.vocab:3"), "bad score: %s",
          bam_error_message());
  bam_error_clear();
}

/* ---- 3. against spm_encode and the token files of the prepared test data ---- */

/* Writes, for a byte budget spread over the domains' val.jsonl (documents in file order),
 * docs.bin (per document: the domain, NUL, 8-byte little-endian length, UTF-8 text) and
 * lines.txt, the document lines as data/prepare.py hands them to spm_encode: every line with
 * its newline written as U+23CE, a last line without newline as it is. */
static const char *extract_py =
    "import glob, json, os, sys\n"
    "data, out, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
    "NL = '\\u23ce'.encode()\n"
    "files = sorted(glob.glob(os.path.join(data, 'text', '*', 'val.jsonl')))\n"
    "if not files: sys.exit('no text/*/val.jsonl under ' + data)\n"
    "per = budget // len(files)\n"
    "with open(os.path.join(out, 'docs.bin'), 'wb') as docs, \\\n"
    "     open(os.path.join(out, 'lines.txt'), 'wb') as lines:\n"
    "    for f in files:\n"
    "        dom, used = os.path.basename(os.path.dirname(f)), 0\n"
    "        for raw in open(f, encoding='utf-8'):\n"
    "            if used >= per: break\n"
    "            text = json.loads(raw)['text'].encode('utf-8', 'surrogatepass')\n"
    "            used += len(text)\n"
    "            docs.write(dom.encode() + b'\\0' + len(text).to_bytes(8, 'little') + text)\n"
    "            parts = text.split(b'\\n')\n"
    "            for p in parts[:-1]: lines.write(p + NL + b'\\n')\n"
    "            if parts[-1]: lines.write(parts[-1] + b'\\n')\n";

typedef struct {
  char domain[BAM_NAME_MAX];
  char *text;
  size_t len;
} doc;

static int load_docs(const char *path, doc **out) {
  size_t n = 0, cap = 0, size;
  char *buf = slurp(path, &size);
  doc *docs = NULL;
  if (!buf) return -1;
  for (size_t at = 0; at < size;) {
    const char *dom = buf + at;
    size_t dl = strnlen(dom, size - at);
    uint64_t len = 0;
    if (at + dl + 9 > size) break;
    memcpy(&len, buf + at + dl + 1, 8);
    if (n == cap) {
      cap = cap ? 2 * cap : 256;
      docs = realloc(docs, cap * sizeof *docs);
    }
    bam_strlcpy(docs[n].domain, dom, sizeof docs[n].domain);
    docs[n].len = len;
    docs[n].text = malloc(len + 1);
    memcpy(docs[n].text, buf + at + dl + 9, len);
    docs[n].text[len] = 0;
    n++;
    at += dl + 9 + len;
  }
  free(buf);
  *out = docs;
  return (int)n;
}

/* Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF), written
 * independently of the tokenizer's own check. */
static int valid_utf8(const char *s, size_t n) {
  const uint8_t *p = (const uint8_t *)s;
  for (size_t i = 0; i < n;) {
    uint32_t c = p[i];
    size_t m = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (m == 0 || i + m > n) return 0;
    if (m > 1) c &= 0x3F >> (m - 1);
    for (size_t k = 1; k < m; k++) {
      if ((p[i + k] & 0xC0) != 0x80) return 0;
      c = c << 6 | (p[i + k] & 0x3F);
    }
    static const uint32_t min[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (c < min[m] || c > 0x10FFFF || (c >= 0xD800 && c < 0xE000)) return 0;
    i += m;
  }
  return 1;
}

/* Parse one line of space-separated ids; returns the count. */
static size_t parse_ids(char *line, int32_t *ids, size_t cap) {
  size_t n = 0;
  for (char *p = strtok(line, " \n"); p; p = strtok(NULL, " \n"))
    if (n < cap) ids[n++] = (int32_t)strtol(p, NULL, 10);
  return n;
}

/* Print where got and want (n ids each at most) first differ, with the pieces around. */
static void show_diff(const bam_tokenizer *t, const char *what, const int32_t *got, size_t ng,
                      const int32_t *want, size_t nw) {
  size_t k = 0;
  while (k < ng && k < nw && got[k] == want[k]) k++;
  fprintf(stderr, "MISMATCH %s: %zu ids vs %zu, first difference at %zu: ", what, ng, nw, k);
  for (size_t j = k > 2 ? k - 2 : 0; j < k + 4 && j < ng; j++)
    fprintf(stderr, "[%s]", bam_tokenizer_piece(t, got[j]));
  fprintf(stderr, " vs ");
  for (size_t j = k > 2 ? k - 2 : 0; j < k + 4 && j < nw; j++)
    fprintf(stderr, "[%s]", bam_tokenizer_piece(t, want[j]));
  fprintf(stderr, "\n");
}

/* Every tokens/<domain>.h5 val split loads with this vocabulary size and carries its
 * identity and EOS; decoding it gives back text_bytes of text. Returns the splits loaded. */
static int load_token_files(const char *data, const bam_tokenizer *t, bam_split *splits,
                            int max) {
  char dir[1024];
  snprintf(dir, sizeof dir, "%s/tokens", data);
  DIR *d = opendir(dir);
  T_CHECK(d != NULL, "%s: cannot list the token files", dir);
  if (!d) return 0;
  int n = 0;
  for (struct dirent *e; n < max && (e = readdir(d));) {
    if (!bam_str_ends_with(e->d_name, ".h5")) continue;
    char domain[BAM_NAME_MAX];
    bam_strlcpy(domain, e->d_name, sizeof domain);
    domain[strlen(domain) - 3] = 0;
    bam_split *s = &splits[n];
    bam_status st = bam_split_load(s, data, domain, "val", bam_tokenizer_vocab_size(t));
    T_CHECK(st == BAM_OK, "%s val: %s", domain, bam_error_message());
    bam_error_clear();
    if (st != BAM_OK) continue;
    n++;
    T_CHECK(!strcmp(s->tokenizer, bam_tokenizer_id(t)),
            "%s.h5: attribute 'tokenizer' is '%s', the vocabulary's identity is '%s'", domain,
            s->tokenizer, bam_tokenizer_id(t));
    T_CHECK(s->eos_id == bam_tokenizer_eos(t), "%s.h5: eos_id %d, tokenizer's %d", domain,
            s->eos_id, bam_tokenizer_eos(t));
    int64_t eos = 0;
    for (int64_t i = 0; i < s->n_tokens; i++) eos += s->tokens[i] == s->eos_id;
    T_CHECK(s->n_docs > 0 && eos == s->n_docs, "%s.h5 /val: %lld EOS tokens, n_docs = %lld",
            domain, (long long)eos, (long long)s->n_docs);
    size_t cap = (size_t)s->text_bytes + 1, len = 0;
    char *text = malloc(cap);
    st = bam_tokenizer_decode(t, s->tokens, (size_t)s->n_tokens, text, cap, &len);
    T_CHECK(st == BAM_OK && len == (size_t)s->text_bytes,
            "%s.h5 /val decodes to %zu bytes, text_bytes = %lld: %s", domain, len,
            (long long)s->text_bytes, bam_error_message());
    bam_error_clear();
    free(text);
  }
  closedir(d);
  T_CHECK(n > 0, "%s: no token files", dir);
  return n;
}

static void test_prepared(const char *tmp) {
  const char *data = getenv("BAM_TEST_DATA");
  const char *python = getenv("BAM_PYTHON");
  if (!python || !*python) python = "python3";
  T_CHECK(data && *data, "BAM_TEST_DATA is not set (run through ctest)");
  if (!data || !*data) return;
  char vocab[1024], model[1024];
  snprintf(vocab, sizeof vocab, "%s/tokenizer/spm.vocab", data);
  snprintf(model, sizeof model, "%s/tokenizer/spm.model", data);
  T_CHECK(file_exists(vocab) && file_exists(model),
          "%s: no tokenizer/spm.vocab and spm.model (run data/prepare.sh --test)", data);
  if (!file_exists(vocab) || !file_exists(model)) return;

  bam_tokenizer *t = NULL;
  T_OK(bam_tokenizer_load(&t, vocab));
  if (!t) return;
  printf("tokenizer %s: %d pieces, identity %s\n", vocab, bam_tokenizer_vocab_size(t),
         bam_tokenizer_id(t));
  T_CHECK(bam_tokenizer_eos(t) == 2, "eos id %d", bam_tokenizer_eos(t));

  /* identity = sha256sum prefix */
  char cmd[4096], path[1024];
  snprintf(path, sizeof path, "%s/sha.txt", tmp);
  snprintf(cmd, sizeof cmd, "sha256sum '%s' > '%s'", vocab, path);
  T_CHECK(system(cmd) == 0, "%s failed", cmd);
  char *sha = slurp(path, NULL);
  T_CHECK(sha && !strncmp(sha, bam_tokenizer_id(t), 16) && strlen(bam_tokenizer_id(t)) == 16,
          "identity %s but sha256sum says %.16s", bam_tokenizer_id(t), sha ? sha : "?");
  free(sha);

  /* the val splits: identity, EOS, decoded length */
  bam_split splits[BAM_MAX_DOMAINS * 2];
  int n_splits = load_token_files(data, t, splits, BAM_MAX_DOMAINS * 2);
  int64_t split_pos[BAM_MAX_DOMAINS * 2] = {0};

  /* a loader over every domain's val split reads in-vocabulary windows */
  char spec[1024] = "";
  for (int k = 0; k < n_splits && k < BAM_MAX_DOMAINS; k++) {
    if (k) strcat(spec, ",");
    strcat(spec, splits[k].domain);
  }
  bam_mix mix;
  bam_loader *l = NULL;
  T_OK(bam_mix_parse(&mix, spec));
  T_OK(bam_loader_create(&l, data, &mix, "val", 128, 8, 1, 2, 3, bam_tokenizer_vocab_size(t)));
  if (l) {
    int32_t in[4 * 128], tg[4 * 128];
    int ok = 1;
    for (int b = 0; b < 5; b++) {
      T_OK(bam_loader_next(l, in, tg));
      for (int j = 0; j < 4 * 128; j++)
        ok &= in[j] >= 0 && in[j] < bam_tokenizer_vocab_size(t) && tg[j] >= 0 &&
              tg[j] < bam_tokenizer_vocab_size(t);
    }
    T_CHECK(ok, "loader over %s: ids outside the vocabulary", spec);
    bam_loader_free(&l);
  }

  /* documents, and spm_encode's ids for their lines */
  snprintf(path, sizeof path, "%s/extract.py", tmp);
  spit(path, extract_py);
  const char *budget = getenv("BAM_TOKENIZER_TEST_BYTES");
  snprintf(cmd, sizeof cmd, "'%s' '%s' '%s' '%s' %s", python, path, data, tmp,
           budget ? budget : "600000");
  T_CHECK(system(cmd) == 0, "%s failed", cmd);
  snprintf(cmd, sizeof cmd,
           "spm_encode --model='%s' --output_format=id < '%s/lines.txt' > '%s/ids.txt'", model,
           tmp, tmp);
  T_CHECK(system(cmd) == 0, "%s failed", cmd);
  doc *docs = NULL;
  snprintf(path, sizeof path, "%s/docs.bin", tmp);
  int n_docs = load_docs(path, &docs);
  T_CHECK(n_docs > 0, "%s: no documents", path);
  snprintf(path, sizeof path, "%s/ids.txt", tmp);
  FILE *f = fopen(path, "rb");
  T_CHECK(f != NULL, "%s missing", path);
  if (n_docs <= 0 || !f) {
    if (f) fclose(f);
    bam_tokenizer_free(&t);
    return;
  }

  size_t line_cap = 1 << 16, total_bytes = 0, id_cap = 0, out_cap = 0;
  char *line = malloc(line_cap), *back = NULL;
  int32_t *want = NULL, *got = NULL;
  long lines = 0, line_match = 0;
  int in_split = 0, split_match = 0, rt_ok = 0, rt_skipped = 0, shown = 0, non_ascii = 0;
  double enc_time = 0;
  for (int i = 0; i < n_docs; i++) {
    doc *dc = &docs[i];
    if (3 * dc->len + 8 > id_cap) {
      id_cap = 3 * dc->len + 8;
      want = realloc(want, id_cap * sizeof *want);
      got = realloc(got, id_cap * sizeof *got);
    }
    if (dc->len + 16 > out_cap) {
      out_cap = dc->len + 16;
      back = realloc(back, out_cap);
    }
    /* line by line against spm_encode */
    for (size_t a = 0; a < dc->len;) {
      const char *nl = memchr(dc->text + a, '\n', dc->len - a);
      size_t b = nl ? (size_t)(nl - dc->text) + 1 : dc->len;
      ssize_t ll = getline(&line, &line_cap, f);
      size_t nw = ll > 0 ? parse_ids(line, want, id_cap) : 0, ng = 0;
      bam_status st = bam_tokenizer_encode(t, dc->text + a, b - a, got, id_cap, &ng);
      T_CHECK(st == BAM_OK, "doc %d: %s", i, bam_error_message());
      bam_error_clear();
      int same = ng == nw && !memcmp(got, want, ng * sizeof *got);
      lines++;
      line_match += same;
      if (!same && shown++ < 5) {
        char what[256];
        snprintf(what, sizeof what, "%s doc %d, line at byte %zu, vs spm_encode", dc->domain, i,
                 a);
        show_diff(t, what, got, ng, want, nw);
      }
      a = b;
    }
    /* the whole document at once (no merge crosses a newline) against the token file */
    size_t ng = 0;
    double t0 = bam_now();
    bam_status st = bam_tokenizer_encode(t, dc->text, dc->len, got, id_cap, &ng);
    enc_time += bam_now() - t0;
    total_bytes += dc->len;
    T_CHECK(st == BAM_OK, "doc %d: %s", i, bam_error_message());
    bam_error_clear();
    for (int k = 0; k < n_splits; k++) {
      if (strcmp(splits[k].domain, dc->domain)) continue;
      bam_split *s = &splits[k];
      int64_t from = split_pos[k], to = from;
      while (to < s->n_tokens && s->tokens[to] != s->eos_id) to++;
      if (to >= s->n_tokens) break; /* past the split's documents */
      in_split++;
      int same = (size_t)(to - from) == ng &&
                 !memcmp(got, s->tokens + from, ng * sizeof *got);
      split_match += same;
      if (!same && shown++ < 5) {
        char what[256];
        snprintf(what, sizeof what, "%s doc %d vs tokens/%s.h5 /val", dc->domain, i,
                 dc->domain);
        show_diff(t, what, got, ng, s->tokens + from, (size_t)(to - from));
      }
      split_pos[k] = to + 1;
    }
    /* round trip (of valid UTF-8 free of U+2581 and U+23CE, which prepare.py removes) */
    int ascii = 1;
    for (size_t j = 0; j < dc->len; j++) ascii &= (uint8_t)dc->text[j] < 0x80;
    non_ascii += !ascii;
    if (!valid_utf8(dc->text, dc->len) || memmem(dc->text, dc->len, "\xE2\x96\x81", 3) ||
        memmem(dc->text, dc->len, "\xE2\x8F\x8E", 3)) {
      rt_skipped++;
      continue;
    }
    size_t len = 0;
    st = bam_tokenizer_decode(t, got, ng, back, out_cap, &len);
    int ok = st == BAM_OK && len == dc->len && !memcmp(back, dc->text, len);
    rt_ok += ok;
    T_CHECK(ok, "%s doc %d: decode(encode(text)) differs from the text", dc->domain, i);
    bam_error_clear();
  }
  T_CHECK(getline(&line, &line_cap, f) <= 0, "spm_encode gave more lines than the documents");
  fclose(f);

  double rate = lines ? (double)line_match / lines : 0;
  printf("spm_encode agreement: %ld of %ld lines (%.3f%%) of %d documents, %zu bytes, "
         "%d non-ASCII documents\n",
         line_match, lines, 100 * rate, n_docs, total_bytes, non_ascii);
  printf("token files: %d of %d documents encode exactly to their ids in tokens/*.h5 /val\n",
         split_match, in_split);
  printf("round trip: %d of %d documents exact (%d skipped: malformed UTF-8, U+2581 or "
         "U+23CE in the text)\n",
         rt_ok, n_docs - rt_skipped, rt_skipped);
  printf("encode speed: %.2f MB/s (whole documents)\n",
         total_bytes / 1e6 / (enc_time > 0 ? enc_time : 1e-9));
  T_CHECK(rate >= 0.999, "only %.3f%% of lines match spm_encode", 100 * rate);
  T_CHECK(lines >= 100, "only %ld lines to compare", lines);
  T_CHECK(in_split > 0 && split_match >= 0.999 * in_split,
          "%d of %d documents encode to their ids in the token files", split_match, in_split);

  for (int k = 0; k < n_splits; k++) bam_split_free(&splits[k]);
  for (int i = 0; i < n_docs; i++) free(docs[i].text);
  free(docs);
  free(line);
  free(want);
  free(got);
  free(back);
  bam_tokenizer_free(&t);
}

int main(void) {
  char tmp[] = "/tmp/bam_test_tokenizer_XXXXXX";
  if (!mkdtemp(tmp)) {
    perror("mkdtemp");
    return 1;
  }
  test_sha256();
  test_rules(tmp);
  test_prepared(tmp);
  char cmd[256];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmp);
  BAM_TEST_END();
}
